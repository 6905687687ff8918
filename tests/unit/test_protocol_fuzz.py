"""Hostile input to the message decoder: it returns a TaskMessage or says why not, nothing else."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from heretic_kombu import protocol
from heretic_kombu.exceptions import MalformedMessage

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
typed_envelopes = st.fixed_dictionaries(
    {
        "__type__": st.sampled_from(["datetime", "date", "uuid", "decimal", "bytes", "set", "x"]),
        "__value__": json_values,
    }
)
headers = st.one_of(
    st.none(),
    st.dictionaries(st.text(max_size=12), json_values, max_size=6),
    st.fixed_dictionaries(
        {
            "task": json_values | st.just("jobs.add"),
            "id": json_values | st.just("3c1b6b7e-4b0e-4a59-9f8e-0d3f9f2b8a11"),
        },
        optional={
            "eta": json_values,
            "expires": json_values,
            "retries": json_values,
            "root_id": json_values,
            "heretic_job_id": json_values,
            "group": json_values,
        },
    ),
)
bodies = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200),
    json_values.map(json.dumps),
    st.tuples(
        st.lists(json_values | typed_envelopes, max_size=3),
        st.dictionaries(st.text(max_size=5), json_values | typed_envelopes, max_size=3),
        json_values,
    ).map(lambda t: json.dumps(list(t))),
)
content_types = st.sampled_from(
    ["application/json", "application/x-python-serialize", "application/x-yaml", None, ""]
)


@settings(max_examples=600, deadline=None)
@given(bodies, content_types, headers)
def test_decode_never_raises_anything_but_malformed_message(body, content_type, hdrs):
    try:
        message = protocol.decode(body, content_type, hdrs)
    except MalformedMessage as exc:
        assert str(exc)  # always a reason
    else:
        assert isinstance(message.args, list) and isinstance(message.kwargs, dict)
        assert content_type == "application/json"
