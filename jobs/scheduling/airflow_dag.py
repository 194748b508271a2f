"""Airflow: the example job nightly, then a quick lookup as a smoke check.

Copy into your DAGs folder and set AEFEATURES_HOME to the checkout with its virtualenv.
Exit codes map to task states: 0 success (published or up to date), 3 gate refused,
4 locked, 2 bad input — all non-zero codes fail the task, so retries apply to 4 (locked).
"""

import os
from datetime import datetime, timedelta

from airflow import DAG
from airflow.operators.bash import BashOperator

HOME = os.environ.get("AEFEATURES_HOME", "/srv/aefeatures")
CLI = f"cd {HOME} && .venv/bin/aefeatures"

with DAG(
    dag_id="aefeatures_example",
    schedule="15 2 * * *",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=10)},
) as dag:
    train = BashOperator(task_id="run", bash_command=f"{CLI} --log-format json run jobs/example.toml")
    smoke = BashOperator(task_id="smoke_lookup",
                         bash_command=f"{CLI} recommend --store store --name example --user 42 -k 10 --json")
    train >> smoke
