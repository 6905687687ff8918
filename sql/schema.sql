-- heretic_kombu schema, rendered from heretic_kombu/store/tables.py (`heretic db sql`).
-- Schema version 3. Do not edit by hand: change tables.py and re-render.
CREATE TABLE heretic_beat_entries (
	name TEXT NOT NULL, 
	task_name TEXT NOT NULL, 
	schedule TEXT NOT NULL, 
	last_run_at TIMESTAMP WITH TIME ZONE, 
	total_run_count INTEGER DEFAULT 0 NOT NULL, 
	created_at TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP NOT NULL, 
	updated_at TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP NOT NULL, 
	PRIMARY KEY (name)
);

CREATE TABLE heretic_chords (
	group_id UUID NOT NULL, 
	remaining INTEGER NOT NULL, 
	total INTEGER NOT NULL, 
	body JSONB NOT NULL, 
	created_at TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP NOT NULL, 
	PRIMARY KEY (group_id)
);

CREATE TABLE heretic_jobs (
	id BIGSERIAL NOT NULL, 
	queue_name TEXT NOT NULL, 
	status TEXT DEFAULT 'pending' NOT NULL, 
	payload JSONB, 
	attempt_logs TEXT[] DEFAULT '{}'::text[] NOT NULL, 
	max_attempts INTEGER DEFAULT 1 NOT NULL, 
	created_at TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP NOT NULL, 
	updated_at TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP NOT NULL, 
	last_attempted_at TIMESTAMP WITH TIME ZONE, 
	task_id UUID NOT NULL, 
	task_name TEXT NOT NULL, 
	attempts INTEGER DEFAULT 0 NOT NULL, 
	eta TIMESTAMP WITH TIME ZONE, 
	expires_at TIMESTAMP WITH TIME ZONE, 
	priority INTEGER, 
	result JSONB, 
	error TEXT, 
	traceback TEXT, 
	parent_id UUID, 
	root_id UUID, 
	group_id UUID, 
	worker TEXT, 
	started_at TIMESTAMP WITH TIME ZONE, 
	finished_at TIMESTAMP WITH TIME ZONE, 
	workflow JSONB, 
	PRIMARY KEY (id), 
	UNIQUE (task_id)
);

CREATE INDEX heretic_jobs_created_idx ON heretic_jobs (created_at, id);

CREATE INDEX heretic_jobs_due_idx ON heretic_jobs (eta) WHERE status IN ('scheduled', 'retrying');

CREATE INDEX heretic_jobs_errors_idx ON heretic_jobs (created_at, id) WHERE error IS NOT NULL;

CREATE INDEX heretic_jobs_group_idx ON heretic_jobs (group_id) WHERE group_id IS NOT NULL;

CREATE INDEX heretic_jobs_parent_idx ON heretic_jobs (parent_id) WHERE parent_id IS NOT NULL;

CREATE INDEX heretic_jobs_payload_idx ON heretic_jobs USING gin (payload jsonb_path_ops);

CREATE INDEX heretic_jobs_queue_created_idx ON heretic_jobs (queue_name, created_at, id);

CREATE INDEX heretic_jobs_root_id_idx ON heretic_jobs (root_id);

CREATE INDEX heretic_jobs_status_created_idx ON heretic_jobs (status, created_at, id);

CREATE INDEX heretic_jobs_task_created_idx ON heretic_jobs (task_name, created_at, id);

CREATE OR REPLACE FUNCTION heretic_updated_at_timestamp() RETURNS TRIGGER AS $$
BEGIN
  NEW.updated_at = now();
  RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER update_heretic_jobs_updated_at
  BEFORE UPDATE ON heretic_jobs
  FOR EACH ROW EXECUTE PROCEDURE heretic_updated_at_timestamp();

CREATE TABLE heretic_schema_version (
	version INTEGER NOT NULL, 
	applied_at TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP NOT NULL, 
	PRIMARY KEY (version)
);

INSERT INTO heretic_schema_version (version) VALUES (3);
