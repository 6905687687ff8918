"""The wire format: what encode() produces and what decode() accepts or refuses."""

from __future__ import annotations

import datetime as dt
import json
import pickle
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from heretic_kombu import protocol
from heretic_kombu.exceptions import MalformedMessage
from heretic_kombu.protocol import CONTENT_TYPE, JOB_ID_HEADER, TaskMessage, decode, encode

UTC = dt.timezone.utc


def valid_headers(**overrides: Any) -> dict[str, Any]:
    headers: dict[str, Any] = {"task": "proj.tasks.add", "id": str(uuid.uuid4())}
    headers.update(overrides)
    return headers


def body_of(args: Any = None, kwargs: Any = None, embed: Any = None) -> bytes:
    return json.dumps(
        [[] if args is None else args, {} if kwargs is None else kwargs, embed]
    ).encode()


def refused(body: Any, content_type: str | None = CONTENT_TYPE, headers: Any = None) -> str:
    """decode() must raise MalformedMessage; return its reason."""
    with pytest.raises(MalformedMessage) as info:
        decode(body, content_type, valid_headers() if headers is None else headers)
    return str(info.value)


# -- round trip ---------------------------------------------------------------


def test_encode_then_decode_gives_back_the_same_message() -> None:
    task_id, root_id, parent_id, group = (str(uuid.uuid4()) for _ in range(4))
    when = dt.datetime(2030, 5, 17, 12, 30, 45, 123456, tzinfo=UTC)
    kwargs = {
        "at": dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
        "naive": dt.datetime(2024, 1, 2, 3, 4, 5),
        "day": dt.date(2024, 2, 29),
        "ref": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "amount": Decimal("10.05"),
        "nested": {"list": [1, "two", None, True]},
    }
    message = TaskMessage(
        id=task_id,
        task="proj.tasks.charge",
        args=[1, "x", [2, 3], {"k": "v"}],
        kwargs=kwargs,
        retries=2,
        eta=when,
        expires=when + dt.timedelta(hours=1),
        root_id=root_id,
        parent_id=parent_id,
        group=group,
        job_id=42,
    )

    body, headers, properties = encode(message)
    decoded = decode(body.encode("utf-8"), CONTENT_TYPE, headers)

    assert decoded.id == task_id
    assert decoded.task == "proj.tasks.charge"
    assert decoded.args == [1, "x", [2, 3], {"k": "v"}]
    assert decoded.kwargs == kwargs
    assert type(decoded.kwargs["ref"]) is uuid.UUID
    assert type(decoded.kwargs["amount"]) is Decimal
    assert decoded.retries == 2
    assert decoded.eta == when and decoded.eta.tzinfo is not None
    assert decoded.expires == when + dt.timedelta(hours=1)
    assert decoded.root_id == root_id
    assert decoded.parent_id == parent_id
    assert decoded.group == group
    assert decoded.job_id == 42
    assert headers[JOB_ID_HEADER] == 42
    assert properties["correlation_id"] == task_id


def test_encoded_message_is_celery_protocol_v2() -> None:
    message = TaskMessage(id=str(uuid.uuid4()), task="t", args=[1], kwargs={"a": 2})
    body, headers, _ = encode(message)
    assert json.loads(body)[:2] == [[1], {"a": 2}]
    assert isinstance(json.loads(body)[2], dict)
    assert headers["lang"] == "py"
    assert headers["task"] == "t"
    assert headers["id"] == message.id
    # Without an explicit root, a job is its own root, as in Celery.
    assert headers["root_id"] == message.id
    assert headers["eta"] is None and headers["expires"] is None


def test_decode_accepts_a_minimal_celery_message_without_job_id() -> None:
    task_id = str(uuid.uuid4())
    decoded = decode(body_of([2, 3]), CONTENT_TYPE, {"task": "proj.add", "id": task_id})
    assert (decoded.task, decoded.args, decoded.kwargs) == ("proj.add", [2, 3], {})
    assert decoded.job_id is None
    assert decoded.retries == 0
    assert decoded.eta is None and decoded.root_id is None


def test_decode_takes_a_naive_eta_as_utc() -> None:
    decoded = decode(body_of(), CONTENT_TYPE, valid_headers(eta="2030-01-02T03:04:05"))
    assert decoded.eta == dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_decode_keeps_an_eta_offset() -> None:
    decoded = decode(body_of(), CONTENT_TYPE, valid_headers(eta="2030-01-02T05:04:05+02:00"))
    assert decoded.eta == dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_decode_canonicalises_the_task_id() -> None:
    task_id = uuid.uuid4()
    decoded = decode(body_of(), CONTENT_TYPE, valid_headers(id=str(task_id).upper()))
    assert decoded.id == str(task_id)


# -- refusals -----------------------------------------------------------------


class _CreatesFile:
    """Unpickling this creates the file ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def test_the_hostile_pickle_is_live(tmp_path: Path) -> None:
    # Guards the two tests below: unpickling this payload really would create the file.
    marker = tmp_path / "unpickled"
    pickle.loads(pickle.dumps(_CreatesFile(marker)))
    assert marker.exists()


def test_pickle_content_type_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_CreatesFile(marker))

    reason = refused(payload, "application/x-python-serialize")

    assert "application/x-python-serialize" in reason
    assert not marker.exists()


def test_pickle_bytes_labelled_as_json_are_refused_and_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    reason = refused(pickle.dumps(_CreatesFile(marker)), CONTENT_TYPE)
    assert "JSON" in reason
    assert not marker.exists()


@pytest.mark.parametrize("content_type", [None, "application/x-yaml", "application/x-msgpack"])
def test_other_content_types_are_refused(content_type: str | None) -> None:
    assert "content type" in refused(body_of(), content_type)


@pytest.mark.parametrize("body", [b"not json", b"", None, b"[1, 2", b"\xff\xfe"])
def test_body_that_is_not_json_is_refused(body: bytes | None) -> None:
    assert "not valid JSON" in refused(body)


@pytest.mark.parametrize("decoded", [{"args": []}, [[], {}], [[], {}, None, None], "text", 3, None])
def test_body_that_is_not_a_three_item_array_is_refused(decoded: Any) -> None:
    assert "[args, kwargs, embed]" in refused(json.dumps(decoded).encode())


@pytest.mark.parametrize("args", [{"a": 1}, "1, 2", 5, None])
def test_args_that_are_not_a_list_are_refused(args: Any) -> None:
    body = json.dumps([args, {}, None]).encode()
    assert "args" in refused(body)


@pytest.mark.parametrize("kwargs", [[1, 2], "a=1", 5, None])
def test_kwargs_that_are_not_an_object_are_refused(kwargs: Any) -> None:
    body = json.dumps([[], kwargs, None]).encode()
    assert "kwargs" in refused(body)


def test_embed_that_is_not_an_object_is_refused() -> None:
    assert "embed" in refused(json.dumps([[], {}, [1]]).encode())


@pytest.mark.parametrize(
    "headers",
    [
        {"id": str(uuid.uuid4())},
        {"task": "proj.add"},
        {},
        None,
        ["task", "id"],
    ],
)
def test_missing_task_or_id_header_is_refused(headers: Any) -> None:
    with pytest.raises(MalformedMessage) as info:
        decode(body_of(), CONTENT_TYPE, headers)
    assert "'task' and 'id'" in str(info.value)


@pytest.mark.parametrize("task", ["", 5, None])
def test_task_header_that_is_not_a_name_is_refused(task: Any) -> None:
    assert "'task'" in refused(body_of(), headers=valid_headers(task=task))


@pytest.mark.parametrize("task_id", ["42", "not-a-uuid", 42, None, ""])
def test_id_that_is_not_a_uuid_is_refused(task_id: Any) -> None:
    reason = refused(body_of(), headers=valid_headers(id=task_id))
    assert "'id'" in reason and "UUID" in reason


@pytest.mark.parametrize("name", ["root_id", "parent_id", "group"])
def test_lineage_header_that_is_not_a_uuid_is_refused(name: str) -> None:
    assert repr(name) in refused(body_of(), headers=valid_headers(**{name: "nope"}))


@pytest.mark.parametrize("eta", ["tomorrow", "2030-13-45T00:00:00", "", 1700000000])
def test_bad_eta_is_refused(eta: Any) -> None:
    assert "'eta'" in refused(body_of(), headers=valid_headers(eta=eta))


def test_bad_expires_is_refused() -> None:
    assert "'expires'" in refused(body_of(), headers=valid_headers(expires="never"))


@pytest.mark.parametrize("retries", [-1, "2", 1.5, True, [1]])
def test_retries_that_are_not_a_non_negative_int_are_refused(retries: Any) -> None:
    assert "'retries'" in refused(body_of(), headers=valid_headers(retries=retries))


@pytest.mark.parametrize("job_id", ["42", 4.2, True, [42]])
def test_job_id_header_that_is_not_an_int_is_refused(job_id: Any) -> None:
    reason = refused(body_of(), headers=valid_headers(**{JOB_ID_HEADER: job_id}))
    assert JOB_ID_HEADER in reason


@pytest.mark.parametrize(
    "value",
    [
        {"__type__": "uuid", "__value__": "not-a-mapping"},
        {"__type__": "datetime", "__value__": 5},
        {"__type__": "bytes", "__value__": 5},
    ],
)
def test_malformed_typed_value_envelope_is_refused(value: dict[str, Any]) -> None:
    refused(json.dumps([[value], {}, None]).encode())


def test_unknown_typed_value_envelope_is_refused() -> None:
    body = json.dumps([[{"__type__": "pickle", "__value__": "x"}], {}, None]).encode()
    assert "not valid JSON" in refused(body)


# -- task ids -----------------------------------------------------------------


def test_new_task_ids_are_distinct_uuid4s() -> None:
    first, second = protocol.new_task_id(), protocol.new_task_id()
    assert first != second
    assert uuid.UUID(first).version == 4


@pytest.mark.parametrize("value", ["x", 12, None, b"12345678123456781234567812345678"])
def test_check_task_id_rejects_non_uuids(value: Any) -> None:
    with pytest.raises(ValueError):
        protocol.check_task_id(value)
