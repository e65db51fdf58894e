"""Runs on ECS: the EcsRunLauncher of deploy/ecs/dagster.yaml, given synth-cpt's real jobs, registers the task definitions and
asks ECS for the tasks a cluster would start. moto plays ECS, EC2 and Secrets Manager; only run_task is a test double
(moto's cannot place Dagster's task definitions), and its arguments are what is checked: a GPU for a generation run and none
for the others, keys only by ARN, the run's id among the task's tags."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import boto3
import pytest
import yaml
from dagster._config import process_config
from dagster._core.instance.config import dagster_instance_config
from dagster._core.test_utils import instance_for_test
from dagster._serdes.config_class import ConfigurableClassData, class_from_code_pointer
from moto import mock_aws

from .conftest import runs_of_jobs

REPO = Path(__file__).resolve().parents[1]
DAGSTER_YAML = REPO / "deploy" / "ecs" / "dagster.yaml"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/synth-cpt:test"
CLUSTER = "synth-cpt"
# secrets_tag lookups go through dagster-aws's get_tagged_secrets, marked beta in 0.29; what it returns is asserted below
pytestmark = pytest.mark.filterwarnings("ignore:Function `get_tagged_secrets` is currently in beta")

SECRET_VALUES = {"DAGSTER_PG_URL": "postgresql+psycopg2://dagster:pg-secret-value@db:5432/dagster", "OPENAI_API_KEY": "sk-secret-value"}


@pytest.fixture
def shipped() -> dict:
    return yaml.safe_load(DAGSTER_YAML.read_text())


@pytest.fixture
def aws(monkeypatch, tmp_path):
    """moto's ECS, EC2 and Secrets Manager with fake credentials in us-east-1: a cluster, a subnet, the two secrets the
    shipped file names by ARN (through the environment) and one found by its synth-cpt tag."""
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "ECS_CONTAINER_METADATA_URI_V4", "ECS_CONTAINER_METADATA_URI"):
        monkeypatch.delenv(name, raising=False)
    with mock_aws():
        boto3.client("ecs").create_cluster(clusterName=CLUSTER)
        subnet = boto3.resource("ec2").create_vpc(CidrBlock="10.0.0.0/16").create_subnet(CidrBlock="10.0.0.0/24")
        sm = boto3.client("secretsmanager")
        arns = {name: sm.create_secret(Name=f"synth-cpt/{name}", SecretString=value)["ARN"] for name, value in SECRET_VALUES.items()}
        tagged = sm.create_secret(Name="HF_TOKEN", SecretString="hf-secret-value", Tags=[{"Key": "synth-cpt", "Value": "1"}])["ARN"]
        monkeypatch.setenv("SYNTH_CPT_PG_URL_SECRET_ARN", arns["DAGSTER_PG_URL"])
        monkeypatch.setenv("SYNTH_CPT_OPENAI_KEY_SECRET_ARN", arns["OPENAI_API_KEY"])
        yield {"subnet": subnet.id, "arns": {**arns, "HF_TOKEN": tagged}}


@pytest.fixture
def pipeline_env(fresh_definitions):
    """fresh_definitions, with the outputs on S3 (the run task gets SYNTH_CPT_HOME through env_vars)."""
    return lambda generation=None: fresh_definitions(generation, home="s3://synth-cpt-data/home")


def launch_jobs(shipped: dict, aws: dict, runs: list[tuple[str, dict]]) -> list[tuple[dict, dict]]:
    """Launch each (job name, extra run tags) with the shipped run_launcher; per run, the run_task arguments and the task
    definition it names (as moto registered it)."""
    launcher_config = dict(shipped["run_launcher"]["config"])
    # No ECS task metadata endpoint in a test: the cluster and network the daemon's task would lend are given instead.
    launcher_config["use_current_ecs_task_config"] = False
    launcher_config["run_task_kwargs"] = {
        "cluster": CLUSTER,
        "launchType": "EC2",  # GPU runs need EC2 capacity: Fargate has no GPUs
        "networkConfiguration": {"awsvpcConfiguration": {"subnets": [aws["subnet"]], "assignPublicIp": "DISABLED"}},
    }
    results = []
    with instance_for_test({"run_launcher": {**shipped["run_launcher"], "config": launcher_config}}) as instance:
        launcher = instance.run_launcher
        with runs_of_jobs(instance, IMAGE, runs) as (workspace, created):
            for job_name, run in created:
                task = {
                    "taskArn": f"arn:aws:ecs:us-east-1:123456789012:task/{CLUSTER}/{run.run_id[:8]}",
                    "clusterArn": f"arn:aws:ecs:us-east-1:123456789012:cluster/{CLUSTER}",
                }
                with mock.patch.object(launcher.ecs, "run_task", return_value={"tasks": [task], "failures": []}) as run_task:
                    instance.launch_run(run.run_id, workspace)
                kwargs = run_task.call_args.kwargs
                definition = launcher.ecs.describe_task_definition(taskDefinition=kwargs["taskDefinition"])["taskDefinition"]
                assert {"key": "dagster/run_id", "value": run.run_id} in kwargs["tags"]
                assert {"key": "dagster/job_name", "value": job_name} in kwargs["tags"]
                assert instance.get_run_by_id(run.run_id).tags["ecs/task_arn"] == task["taskArn"]
                results.append((kwargs, definition))
    return results


def show(label: str, kwargs: dict, definition: dict) -> None:
    container = definition["containerDefinitions"][0]
    override = kwargs["overrides"]["containerOverrides"][0]
    print(
        f"\n{label}: run_task cluster={kwargs['cluster']} launchType={kwargs['launchType']} tags={json.dumps(kwargs['tags'])}\n"
        f"  containerOverrides[0]={json.dumps({k: v for k, v in override.items() if k != 'command'})} command={override['command'][:3]}\n"
        f"  task overrides cpu={kwargs['overrides'].get('cpu')} memory={kwargs['overrides'].get('memory')}\n"
        f"  task definition {definition['family']}: image={container['image']} cpu={definition['cpu']} memory={definition['memory']}\n"
        f"  secrets={json.dumps(container['secrets'])}\n"
        f"  environment={json.dumps(container['environment'])}"
    )


def assert_keys_by_arn_only(aws: dict, kwargs: dict, definition: dict) -> None:
    """Every key reaches the task as an ECS secret naming its ARN; no secret value is in the task definition or the request."""
    container = definition["containerDefinitions"][0]
    assert sorted(container["secrets"], key=lambda s: s["name"]) == [
        {"name": name, "valueFrom": aws["arns"][name]} for name in ("DAGSTER_PG_URL", "HF_TOKEN", "OPENAI_API_KEY")
    ]
    assert not {e["name"] for e in container["environment"]} & {"DAGSTER_PG_URL", "HF_TOKEN", "OPENAI_API_KEY"}
    sent = json.dumps([kwargs, definition], default=str)
    for value in (*SECRET_VALUES.values(), "hf-secret-value"):
        assert value not in sent


def test_generation_run_gets_a_gpu_and_other_runs_none(shipped, aws, pipeline_env):
    pipeline_env()  # the shipped generation defaults: tensor_parallel_size 1, cluster_gpus unset -> 1 GPU
    (synthesis, synthesis_def), (ingest, ingest_def) = launch_jobs(
        shipped,
        aws,
        [("synthesis_job", {"dagster/partition": "pt|high"}), ("ingest_drop_job", {"dagster/partition": "drop-0001.jsonl"})],
    )
    show("synthesis_job", synthesis, synthesis_def)
    show("ingest_drop_job", ingest, ingest_def)

    # synthesis_job's ecs/container_overrides tag (synth_cpt/defs/cluster.py)
    assert synthesis["overrides"]["containerOverrides"][0]["resourceRequirements"] == [{"type": "GPU", "value": "1"}]
    assert "resourceRequirements" not in ingest["overrides"]["containerOverrides"][0]
    assert "GPU" not in json.dumps([ingest, ingest_def], default=str)

    for kwargs, definition, job_name in ((synthesis, synthesis_def, "synthesis_job"), (ingest, ingest_def, "ingest_drop_job")):
        container = definition["containerDefinitions"][0]
        override = kwargs["overrides"]["containerOverrides"][0]
        assert kwargs["cluster"] == CLUSTER and kwargs["launchType"] == "EC2"
        assert container["name"] == override["name"] == "run"
        assert container["image"] == IMAGE
        assert override["command"][:3] == ["dagster", "api", "execute_run"]
        # run_resources: the CPU runs' size, on the task definition
        assert (definition["cpu"], definition["memory"]) == ("2048", "8192")
        env = {e["name"]: e["value"] for e in container["environment"]}
        assert env["DAGSTER_RUN_JOB_NAME"] == job_name
        # env_vars: passed through from the launcher's own environment
        assert env["SYNTH_CPT_HOME"] == "s3://synth-cpt-data/home"
        assert env["SYNTH_CPT_CONFIG"].endswith("pipeline.yaml")
        assert_keys_by_arn_only(aws, kwargs, definition)


def test_no_gpu_when_generation_runs_on_a_vllm_fleet(shipped, aws, pipeline_env):
    pipeline_env(
        {"backend": "openai", "endpoints": ["http://vllm.internal:8000/v1"], "served_model_name": "synth-cpt-generator", "cluster_gpus": 0}
    )
    ((synthesis, definition),) = launch_jobs(shipped, aws, [("synthesis_job", {"dagster/partition": "pt|high"})])
    show("synthesis_job, cluster_gpus 0", synthesis, definition)
    assert "resourceRequirements" not in synthesis["overrides"]["containerOverrides"][0]
    assert "GPU" not in json.dumps([synthesis, definition], default=str)
    assert_keys_by_arn_only(aws, synthesis, definition)


def test_shipped_instance_config_is_valid(shipped, monkeypatch, tmp_path):
    """deploy/ecs/dagster.yaml passes Dagster's instance schema and each class's own config schema (environment-sourced
    values resolved), queues one run per partition like the repository's dagster.yaml, and names psycopg2 in its URL."""
    monkeypatch.setenv("DAGSTER_PG_URL", "postgresql+psycopg2://dagster:pw@db.internal:5432/dagster")
    monkeypatch.setenv("SYNTH_CPT_PG_URL_SECRET_ARN", "arn:aws:secretsmanager:us-east-1:123456789012:secret:synth-cpt/pg-AbCdEf")
    monkeypatch.setenv("SYNTH_CPT_OPENAI_KEY_SECRET_ARN", "arn:aws:secretsmanager:us-east-1:123456789012:secret:synth-cpt/openai-AbCdEf")
    monkeypatch.setenv("SYNTH_CPT_LOG_BUCKET", "synth-cpt-data")
    (tmp_path / "dagster.yaml").write_text(DAGSTER_YAML.read_text())
    config, _ = dagster_instance_config(str(tmp_path))

    for section in ("run_launcher", "run_coordinator", "compute_logs"):
        # how the instance names the class (dagster.core.* is dagster._core.*), without building it
        data = ConfigurableClassData(config[section]["module"], config[section]["class"], yaml.safe_dump(config[section]["config"]))
        processed = process_config(class_from_code_pointer(data.module_name, data.class_name).config_type(), data.config_dict)
        assert processed.success, (section, processed.errors)
    launcher = process_config(class_from_code_pointer("dagster_aws.ecs", "EcsRunLauncher").config_type(), config["run_launcher"]["config"])
    assert [s["valueFrom"] for s in launcher.value["secrets"]] == [
        "arn:aws:secretsmanager:us-east-1:123456789012:secret:synth-cpt/pg-AbCdEf",
        "arn:aws:secretsmanager:us-east-1:123456789012:secret:synth-cpt/openai-AbCdEf",
    ]
    assert launcher.value["include_sidecars"] is False
    assert launcher.value["secrets_tag"] == "synth-cpt"

    storage = class_from_code_pointer("dagster_postgres", "PostgresRunStorage").config_type()
    processed = process_config(storage, config["storage"]["postgres"])
    assert processed.success, processed.errors
    assert processed.value["postgres_url"].startswith("postgresql+psycopg2://")

    repository = yaml.safe_load((REPO / "dagster.yaml").read_text())
    limits = config["run_coordinator"]["config"]["tag_concurrency_limits"]
    assert limits == repository["concurrency"]["runs"]["tag_concurrency_limits"]
    assert limits == [{"key": "dagster/partition", "value": {"applyLimitPerUniqueValue": True}, "limit": 1}]
    assert shipped["compute_logs"]["module"] == "dagster_aws.s3.compute_log_manager"
