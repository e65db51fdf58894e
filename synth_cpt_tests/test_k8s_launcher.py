"""Runs on Kubernetes: the K8sRunLauncher of deploy/k8s/values.yaml, given synth-cpt's real jobs, writes the Job bodies a
cluster would get. No cluster: the batch API is a MagicMock (as in dagster-k8s's own launcher tests) and the Job body it was
handed is what is checked: a GPU for a generation run and none for the others, keys only by Secret name, the code
location's image."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest
import yaml
from dagster._config import process_config
from dagster._core.launcher import LaunchRunContext
from dagster._core.test_utils import instance_for_test
from dagster_k8s import K8sRunLauncher
from kubernetes import client

from .conftest import runs_of_jobs

REPO = Path(__file__).resolve().parents[1]
VALUES = REPO / "deploy" / "k8s" / "values.yaml"
IMAGE = "synth-cpt:test"
RELEASE = "dagster"  # `helm upgrade --install dagster ...`: the chart names the service account and instance ConfigMap after it
NAMESPACE = "synth-cpt"
SECRET = "synth-cpt-keys"
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "OPENAI_API_KEY", "DAGSTER_PG_PASSWORD")
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}

# A kubeconfig that names a cluster and nothing else: K8sRunLauncher loads one at construction, and the MagicMock batch API
# means nothing ever talks to it.
FAKE_KUBECONFIG = """
apiVersion: v1
kind: Config
current-context: fake
contexts:
  - name: fake
    context: {cluster: fake}
clusters:
  - name: fake
    cluster: {server: "https://127.0.0.1:1"}
"""

# values.yaml keys -> the instance's run_launcher config, as the chart's _run-launcher.tpl (dagsterYaml.runLauncher.k8s) renders them
_LISTS_OF_NAMES = {"envConfigMaps": "env_config_maps", "envSecrets": "env_secrets"}
_AS_IS = {
    "envVars": "env_vars",
    "volumeMounts": "volume_mounts",
    "volumes": "volumes",
    "labels": "labels",
    "resources": "resources",
    "schedulerName": "scheduler_name",
    "securityContext": "security_context",
}
_RUN_K8S_CONFIG = {
    "containerConfig": "container_config",
    "podSpecConfig": "pod_spec_config",
    "podTemplateSpecMetadata": "pod_template_spec_metadata",
    "jobSpecConfig": "job_spec_config",
    "jobMetadata": "job_metadata",
}


def chart_run_launcher_config(values: dict) -> dict:
    """The run_launcher config the Helm chart writes into the instance ConfigMap for these values. A key of values.yaml this
    does not translate fails the test, so the file cannot hold a setting the test silently skips."""
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    k8s = values["runLauncher"]["config"]["k8sRunLauncher"]
    handled = {"loadInclusterConfig", "kubeconfigFile", "jobNamespace", "imagePullPolicy", "failPodOnRunFailure", "runK8sConfig"}
    unknown = set(k8s) - handled - set(_LISTS_OF_NAMES) - set(_AS_IS)
    assert not unknown, f"values.yaml runLauncher keys the test does not translate: {sorted(unknown)}"
    config: dict = {
        "load_incluster_config": k8s["loadInclusterConfig"],
        "job_namespace": k8s.get("jobNamespace") or NAMESPACE,
        "image_pull_policy": k8s["imagePullPolicy"],
        "service_account_name": RELEASE,
        "dagster_home": values.get("global", {}).get("dagsterHome", "/opt/dagster/dagster_home"),
        "instance_config_map": f"{RELEASE}-instance",
        "postgres_password_secret": values["global"]["postgresqlSecretName"],
    }
    if k8s.get("kubeconfigFile"):
        config["kubeconfig_file"] = k8s["kubeconfigFile"]
    for key, name in _LISTS_OF_NAMES.items():
        if k8s.get(key):
            config[name] = [item["name"] for item in k8s[key] if "name" in item]
    for key, name in _AS_IS.items():
        if k8s.get(key):
            config[name] = k8s[key]
    if k8s.get("failPodOnRunFailure"):
        config["fail_pod_on_run_failure"] = True
    if k8s.get("runK8sConfig"):
        config["run_k8s_config"] = {_RUN_K8S_CONFIG[k]: v for k, v in k8s["runK8sConfig"].items() if v}
    return config


@pytest.fixture
def values() -> dict:
    return yaml.safe_load(VALUES.read_text())


@pytest.fixture
def pipeline_env(fresh_definitions):
    return fresh_definitions


def launch_jobs(values: dict, kubeconfig: Path, runs: list[tuple[str, dict]]) -> list[dict]:
    """Launch each (job name, extra run tags) through the chart's K8sRunLauncher; the Job bodies handed to the batch API,
    as the API server would receive them (camelCase JSON)."""
    kubeconfig.write_text(FAKE_KUBECONFIG)
    config = chart_run_launcher_config(values)
    config |= {"load_incluster_config": False, "kubeconfig_file": str(kubeconfig)}  # in-cluster config needs a pod
    processed = process_config(K8sRunLauncher.config_type(), config)
    assert processed.success, processed.errors
    batch_api = mock.MagicMock()
    launcher = K8sRunLauncher(**processed.value, k8s_client_batch_api=batch_api)
    bodies = []
    with instance_for_test() as instance:
        launcher.register_instance(instance)
        with runs_of_jobs(instance, IMAGE, runs) as (workspace, created):
            for _, run in created:
                launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=workspace))
                call = batch_api.create_namespaced_job.call_args
                assert call.kwargs["namespace"] == NAMESPACE
                body = client.ApiClient().sanitize_for_serialization(call.kwargs["body"])
                assert body["metadata"]["name"] == f"dagster-run-{run.run_id}"
                bodies.append(body)
    assert batch_api.create_namespaced_job.call_count == len(runs)
    return bodies


def show(label: str, body: dict) -> None:
    pod = body["spec"]["template"]["spec"]
    container = pod["containers"][0]
    print(
        f"\n{label}: image={container['image']} args={container['args'][:3]}\n"
        f"  resources={json.dumps(container.get('resources'), sort_keys=True)}\n"
        f"  tolerations={json.dumps(pod.get('tolerations'))} envFrom={json.dumps(container.get('envFrom'))}\n"
        f"  env={json.dumps(container.get('env', []))}\n"
        f"  job spec: backoffLimit={body['spec'].get('backoffLimit')} ttlSecondsAfterFinished={body['spec'].get('ttlSecondsAfterFinished')}"
    )


def assert_no_literal_secrets(body: dict) -> None:
    """Keys reach the pod only by reference: no env entry named after a key carries a value."""
    for container in body["spec"]["template"]["spec"]["containers"]:
        for entry in container.get("env", []):
            if entry["name"] in SECRET_KEYS:
                assert "value" not in entry and "secretKeyRef" in entry["valueFrom"], entry
        assert {"secretRef": {"name": SECRET}} in container["envFrom"]


def test_generation_run_gets_a_gpu_and_other_runs_none(values, pipeline_env, tmp_path):
    pipeline_env()  # the shipped generation defaults: tensor_parallel_size 1, cluster_gpus unset -> 1 GPU
    synthesis, ingest = launch_jobs(
        values,
        tmp_path / "kubeconfig",
        [("synthesis_job", {"dagster/partition": "pt|high"}), ("ingest_drop_job", {"dagster/partition": "drop-0001.jsonl"})],
    )
    show("synthesis_job", synthesis)
    show("ingest_drop_job", ingest)

    gpu_pod = synthesis["spec"]["template"]["spec"]
    gpu = gpu_pod["containers"][0]
    # the GPU of synthesis_job's dagster-k8s/config tag, deep-merged over runK8sConfig's CPU and memory floor
    assert gpu["resources"] == {
        "limits": {"memory": "16Gi", "nvidia.com/gpu": "1"},
        "requests": {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "1"},
    }
    assert gpu_pod["tolerations"] == [GPU_TOLERATION]

    cpu_pod = ingest["spec"]["template"]["spec"]
    cpu = cpu_pod["containers"][0]
    assert cpu["resources"] == {"limits": {"memory": "16Gi"}, "requests": {"cpu": "2", "memory": "8Gi"}}
    assert "nvidia.com/gpu" not in json.dumps(ingest)
    assert not cpu_pod.get("tolerations")

    for body, job_name in ((synthesis, "synthesis_job"), (ingest, "ingest_drop_job")):
        pod = body["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["image"] == IMAGE
        assert container["imagePullPolicy"] == "IfNotPresent"
        assert container["args"][:3] == ["dagster", "api", "execute_run"]
        assert container["envFrom"] == [{"secretRef": {"name": SECRET}}]
        assert_no_literal_secrets(body)
        env = {e["name"]: e for e in container["env"]}
        assert env["DAGSTER_RUN_JOB_NAME"]["value"] == job_name
        # the Postgres password of the chart's Secret, by reference
        assert env["DAGSTER_PG_PASSWORD"]["valueFrom"] == {
            "secretKeyRef": {"name": "dagster-postgresql-secret", "key": "postgresql-password"}
        }
        assert pod["serviceAccountName"] == RELEASE
        assert body["spec"]["backoffLimit"] == 0
        assert body["spec"]["ttlSecondsAfterFinished"] == 86400
        assert body["metadata"]["labels"]["app.kubernetes.io/part-of"] == "synth-cpt"


def test_no_gpu_when_generation_runs_on_a_vllm_fleet(values, pipeline_env, tmp_path):
    # deploy/k8s/vllm.yaml's settings: generation goes to the fleet's Service, the run itself needs no GPU
    pipeline_env(
        {
            "backend": "openai",
            "endpoints": ["http://vllm.synth-cpt.svc.cluster.local:8000/v1"],
            "served_model_name": "synth-cpt-generator",
            "cluster_gpus": 0,
        }
    )
    (synthesis,) = launch_jobs(values, tmp_path / "kubeconfig", [("synthesis_job", {"dagster/partition": "pt|high"})])
    show("synthesis_job, cluster_gpus 0", synthesis)
    pod = synthesis["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"] == {"limits": {"memory": "16Gi"}, "requests": {"cpu": "2", "memory": "8Gi"}}
    assert "nvidia.com/gpu" not in json.dumps(synthesis)
    assert not pod.get("tolerations")
    assert_no_literal_secrets(synthesis)


def test_values_queue_one_run_per_partition_like_the_repository_instance(values):
    """The chart's run queue has the limit of the repository's dagster.yaml, and the Postgres of the chart is an external one."""
    repository = yaml.safe_load((REPO / "dagster.yaml").read_text())
    queued = values["dagsterDaemon"]["runCoordinator"]
    assert queued["enabled"] is True and queued["type"] == "QueuedRunCoordinator"
    limits = queued["config"]["queuedRunCoordinator"]["tagConcurrencyLimits"]
    assert limits == repository["concurrency"]["runs"]["tag_concurrency_limits"]
    assert limits == [{"key": "dagster/partition", "value": {"applyLimitPerUniqueValue": True}, "limit": 1}]
    assert values["postgresql"]["enabled"] is False
    assert values["postgresql"]["postgresqlScheme"] == "postgresql+psycopg2"
    assert values["generatePostgresqlPasswordSecret"] is False
    assert "postgresqlPassword" not in values["postgresql"]
    assert values["computeLogManager"]["type"] == "S3ComputeLogManager"
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "synth_cpt.definitions"]
    env = {e["name"]: e["value"] for e in deployment["env"]}
    assert env["SYNTH_CPT_HOME"].startswith("s3://")
    mount = deployment["volumeMounts"][0]
    assert env["SYNTH_CPT_CONFIG"] == mount["mountPath"] + "/pipeline.yaml"
    assert deployment["volumes"][0] == {"name": mount["name"], "configMap": {"name": "synth-cpt-config"}}


def test_vllm_fleet_manifest():
    """deploy/k8s/vllm.yaml reads as Kubernetes objects: GPU replicas serving on the Service's port, ready on /health,
    the HF token by Secret reference."""
    deployment, service = yaml.safe_load_all((REPO / "deploy" / "k8s" / "vllm.yaml").read_text())
    api = client.ApiClient()
    deployment = api._ApiClient__deserialize(deployment, "V1Deployment")
    service = api._ApiClient__deserialize(service, "V1Service")
    (container,) = deployment.spec.template.spec.containers
    print(f"\nvllm: image={container.image} command={container.command} args={container.args}")
    assert container.command == ["vllm", "serve"]
    assert "--port=8000" in container.args and "--host=0.0.0.0" in container.args
    served = [a.split("=", 1)[1] for a in container.args if a.startswith("--served-model-name=")]
    assert served == ["synth-cpt-generator"]
    assert container.resources.limits["nvidia.com/gpu"] == container.resources.requests["nvidia.com/gpu"] == "1"
    assert (container.readiness_probe.http_get.path, container.readiness_probe.http_get.port) == ("/health", 8000)
    (hf,) = container.env
    assert hf.name == "HF_TOKEN" and hf.value is None and hf.value_from.secret_key_ref.name == "hf-token"
    assert service.metadata.name == "vllm" and service.spec.type == "ClusterIP"
    assert [(p.port, p.target_port) for p in service.spec.ports] == [(8000, 8000)]
    assert service.spec.selector == deployment.spec.selector.match_labels
    assert deployment.spec.selector.match_labels.items() <= deployment.spec.template.metadata.labels.items()
