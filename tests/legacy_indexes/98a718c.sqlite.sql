-- The index as dicom_node/models.py at commit 98a718c created it (SQLAlchemy's DDL for sqlite), for tests/test_migrations.py.
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
	received_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (sop_instance_uid), 
	FOREIGN KEY(series_pk) REFERENCES series (id)
);

CREATE INDEX ix_instances_series_pk ON instances (series_pk);

CREATE TABLE jobs (
	id INTEGER NOT NULL, 
	instance_pk INTEGER NOT NULL, 
	kind VARCHAR(32) NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	attempts INTEGER NOT NULL, 
	last_error TEXT, 
	created_at DATETIME NOT NULL, 
	available_at DATETIME NOT NULL, 
	updated_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(instance_pk) REFERENCES instances (id)
);

CREATE INDEX ix_jobs_claimable ON jobs (state, available_at);

CREATE INDEX ix_jobs_instance_pk ON jobs (instance_pk);
