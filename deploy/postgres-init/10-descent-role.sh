#!/bin/sh
# The role Descent's services (and MLflow) connect as: it owns the job store and MLflow's
# database and nothing else. Not a superuser, cannot create roles or databases, cannot
# bypass row security or replicate: a leaked DATABASE_URL reaches those two databases,
# not the server (no COPY ... PROGRAM, no other database, no other role).
#
# The postgres image runs this once, as its superuser, when it initialises an empty data
# volume. Run by hand (an existing volume) with the same variables and PGHOST set.
set -eu
: "${DESCENT_DB_PASSWORD:?set DESCENT_DB_PASSWORD}"
psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
    -v role="${DESCENT_DB_USER:-descent}" -v password="$DESCENT_DB_PASSWORD" \
    -v descent_db="${DESCENT_DB:-descent}" -v mlflow_db="${MLFLOW_DB:-mlflow}" <<'SQL'
CREATE ROLE :"role" LOGIN PASSWORD :'password'
    NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
-- Owning a database lets the role create its tables (Alembic, MLflow's own migrations)
-- and schemas (Optuna's `optuna`), and nothing outside it.
CREATE DATABASE :"descent_db" OWNER :"role";
CREATE DATABASE :"mlflow_db" OWNER :"role";
-- Nobody else connects to them (PUBLIC has CONNECT on every new database by default).
REVOKE ALL ON DATABASE :"descent_db" FROM PUBLIC;
REVOKE ALL ON DATABASE :"mlflow_db" FROM PUBLIC;
SQL
