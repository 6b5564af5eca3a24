-- Runs once, when the postgres service initialises an empty data volume (the official image runs
-- /docker-entrypoint-initdb.d/*.sql). POSTGRES_DB already created the MLflow database; Prefect
-- gets its own, since both keep their schema version in a table named alembic_version.
CREATE DATABASE prefect;
