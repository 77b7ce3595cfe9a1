-- MLflow's tracking store lives beside the job store, in its own database.
-- The postgres image runs this once, when it initialises an empty data volume.
CREATE DATABASE mlflow;
