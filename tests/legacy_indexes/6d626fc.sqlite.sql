-- The index as dicom_node/models.py at commit 6d626fc created it (SQLAlchemy's DDL for sqlite), for tests/test_migrations.py.
CREATE TABLE patients (
	id INTEGER NOT NULL, 
	patient_id VARCHAR(64) NOT NULL, 
	storage_key VARCHAR(64) NOT NULL, 
	name VARCHAR(324), 
	sex VARCHAR(16), 
	birth_date DATE, 
	PRIMARY KEY (id), 
	UNIQUE (patient_id), 
	UNIQUE (storage_key)
);

CREATE TABLE studies (
	id INTEGER NOT NULL, 
	study_instance_uid VARCHAR(64) NOT NULL, 
	patient_pk INTEGER NOT NULL, 
	study_date DATE, 
	accession_number VARCHAR(16), 
	description VARCHAR(64), 
	PRIMARY KEY (id), 
	UNIQUE (study_instance_uid), 
	FOREIGN KEY(patient_pk) REFERENCES patients (id)
);

CREATE INDEX ix_studies_patient_pk ON studies (patient_pk);

CREATE TABLE series (
	id INTEGER NOT NULL, 
	series_instance_uid VARCHAR(64) NOT NULL, 
	study_pk INTEGER NOT NULL, 
	modality VARCHAR(16), 
	body_part_examined VARCHAR(64), 
	description VARCHAR(64), 
	PRIMARY KEY (id), 
	UNIQUE (series_instance_uid), 
	FOREIGN KEY(study_pk) REFERENCES studies (id)
);

CREATE INDEX ix_series_study_pk ON series (study_pk);

CREATE TABLE instances (
	id INTEGER NOT NULL, 
	sop_instance_uid VARCHAR(64) NOT NULL, 
	series_pk INTEGER NOT NULL, 
	sop_class_uid VARCHAR(64) NOT NULL, 
	transfer_syntax_uid VARCHAR(64) NOT NULL, 
	instance_number INTEGER, 
	rows INTEGER, 
	columns INTEGER, 
	path VARCHAR(512) NOT NULL, 
	size_bytes INTEGER NOT NULL, 
	calling_ae VARCHAR(16), 
	source_instance_pk INTEGER, 
	received_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (sop_instance_uid), 
	FOREIGN KEY(series_pk) REFERENCES series (id), 
	FOREIGN KEY(source_instance_pk) REFERENCES instances (id)
);

CREATE INDEX ix_instances_series_pk ON instances (series_pk);

CREATE INDEX ix_instances_source_instance_pk ON instances (source_instance_pk);

CREATE TABLE deliveries (
	id INTEGER NOT NULL, 
	instance_pk INTEGER NOT NULL, 
	destination VARCHAR(64) NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	attempts INTEGER NOT NULL, 
	last_status INTEGER, 
	last_error TEXT, 
	created_at DATETIME NOT NULL, 
	available_at DATETIME NOT NULL, 
	sent_at DATETIME, 
	updated_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (instance_pk, destination), 
	FOREIGN KEY(instance_pk) REFERENCES instances (id)
);

CREATE INDEX ix_deliveries_due ON deliveries (state, available_at);

CREATE INDEX ix_deliveries_instance_pk ON deliveries (instance_pk);

CREATE TABLE jobs (
	id INTEGER NOT NULL, 
	instance_pk INTEGER NOT NULL, 
	kind VARCHAR(32) NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	attempts INTEGER NOT NULL, 
	generation INTEGER NOT NULL, 
	last_error TEXT, 
	note TEXT, 
	created_at DATETIME NOT NULL, 
	available_at DATETIME NOT NULL, 
	updated_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(instance_pk) REFERENCES instances (id)
);

CREATE INDEX ix_jobs_claimable ON jobs (state, available_at);

CREATE INDEX ix_jobs_instance_pk ON jobs (instance_pk);

CREATE TABLE results (
	id INTEGER NOT NULL, 
	instance_pk INTEGER NOT NULL, 
	task VARCHAR(32) NOT NULL, 
	output VARCHAR(16) NOT NULL, 
	is_primary BOOLEAN NOT NULL, 
	summary VARCHAR(160) NOT NULL, 
	"values" JSON NOT NULL, 
	heatmap_path VARCHAR(512) NOT NULL, 
	model_name VARCHAR(64) NOT NULL, 
	model_version VARCHAR(32) NOT NULL, 
	weights_digest VARCHAR(128) NOT NULL, 
	demo_model BOOLEAN NOT NULL, 
	timings_ms JSON NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (instance_pk, task, output), 
	FOREIGN KEY(instance_pk) REFERENCES instances (id)
);

CREATE INDEX ix_results_instance_pk ON results (instance_pk);

CREATE TABLE tracking (
	id INTEGER NOT NULL, 
	instance_pk INTEGER NOT NULL, 
	result_id INTEGER NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	attempts INTEGER NOT NULL, 
	last_error TEXT, 
	experiment_id VARCHAR(64), 
	run_id VARCHAR(64), 
	available_at DATETIME NOT NULL, 
	logged_at DATETIME, 
	updated_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (instance_pk), 
	FOREIGN KEY(instance_pk) REFERENCES instances (id)
);

CREATE INDEX ix_tracking_due ON tracking (state, available_at);
