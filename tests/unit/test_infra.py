"""The deployment manifests in infra/ agree with the code they launch.

Nothing here needs a server, a cluster or the network: the Prefect project file is checked
against the `retrain` flow object itself, the RayJob's entrypoint against the `genmodels`
command's real options, and the RayService's Serve config against serving/config.yaml and Serve's
own schema, so renaming a parameter or an option breaks these tests, not a 3 a.m. run on a
cluster.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from genmodels.models import FAMILIES

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
PREFECT_FILE = INFRA / "prefect.yaml"
RAYJOB_FILE = INFRA / "k8s" / "rayjob-retrain.yaml"
RAYSERVICE_FILE = INFRA / "k8s" / "rayservice.yaml"
SERVE_CONFIG_FILE = REPO / "serving" / "config.yaml"
SECRET_FILE = INFRA / "k8s" / "secret.example.yaml"

RETRAIN_ENTRYPOINT = "pipelines/flows.py:retrain"
GENERATE_ENTRYPOINT = "pipelines/generate.py:generate"
WORK_POOL = "genmodels"
SECRET_NAME = "genmodels-settings"

# What `genmodels retrain` reads from its environment on a cluster. GENMODELS_STORAGE is only
# needed when no --out is given; the dataset directory only for fashion-mnist without --source.
RETRAIN_SETTINGS = {
    "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "GENMODELS_WORK_DIR",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
}


def _load(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def project() -> dict:
    return _load(PREFECT_FILE)


@pytest.fixture(scope="module")
def deployments(project: dict) -> dict[str, dict]:
    by_name = {d["name"]: d for d in project["deployments"]}
    assert len(by_name) == len(project["deployments"]), "two deployments share a name"
    return by_name


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return _load(RAYJOB_FILE)


@pytest.fixture(scope="module")
def rayservice() -> dict:
    return _load(RAYSERVICE_FILE)


@pytest.fixture(scope="module")
def secret() -> dict:
    return _load(SECRET_FILE)


def _load_entrypoint(entrypoint: str):
    """Import `path/to/file.py:name` as the module it is in the repository (never skipped: a
    missing file or attribute must fail the test, since deploying would fail the same way)."""
    path, _, attr = entrypoint.partition(":")
    assert path.endswith(".py") and attr, f"entrypoint {entrypoint!r} is not 'path/to/file.py:function'"
    assert (REPO / path).is_file(), f"entrypoint {entrypoint!r}: {REPO / path} does not exist"
    module = importlib.import_module(path[: -len(".py")].replace("/", "."))
    assert hasattr(module, attr), f"entrypoint {entrypoint!r}: module {module.__name__} has no {attr!r}"
    return getattr(module, attr)


# ---------------------------------------------------------------------------------------------
# Prefect project file


def test_prefect_file_is_accepted_by_prefect_deploy_schema(project: dict):
    # The model `prefect deploy` itself validates the file with (private, hence imported here
    # only: if Prefect moves it, this import is the line to update).
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(project)
    assert [d.name for d in model.deployments] == [d["name"] for d in project["deployments"]]


@pytest.fixture(scope="module")
def retrain_deployments(deployments: dict) -> dict[str, dict]:
    return {name: d for name, d in deployments.items() if name != "generate"}


def test_one_nightly_deployment_one_on_demand_per_family_and_one_generate(deployments: dict):
    assert set(deployments) == {"retrain-all", "generate"} | {f"retrain-{family}" for family in FAMILIES}
    assert deployments["retrain-all"]["parameters"]["families"] == "all"
    assert deployments["retrain-all"]["parameters"]["preset"] == "quick"
    for family in FAMILIES:
        deployment = deployments[f"retrain-{family}"]
        assert deployment["parameters"]["families"] == family
        assert not deployment.get("schedules"), f"retrain-{family} is on demand, yet has a schedule"


def test_every_retrain_entrypoint_is_the_retrain_flow(retrain_deployments: dict):
    from prefect import Flow

    for name, deployment in retrain_deployments.items():
        assert deployment["entrypoint"] == RETRAIN_ENTRYPOINT, name
        flow = _load_entrypoint(deployment["entrypoint"])
        assert isinstance(flow, Flow), f"{name}: {RETRAIN_ENTRYPOINT} is a {type(flow).__name__}, not a Prefect flow"


def test_generate_deployment_runs_the_generate_flow_once_given_an_output(deployments: dict):
    from prefect import Flow
    from prefect.utilities.callables import parameter_schema

    deployment = deployments["generate"]
    assert deployment["entrypoint"] == GENERATE_ENTRYPOINT
    assert not deployment.get("schedules"), "bulk generation is on demand"
    flow = _load_entrypoint(GENERATE_ENTRYPOINT)
    assert isinstance(flow, Flow) and flow.name == "generate"
    # What `prefect deploy` records; a run must name its output, so the deployment gives none.
    schema = parameter_schema(flow.fn).model_dump()
    assert set(schema["required"]) == {"model", "n", "out"}
    assert "out" not in deployment["parameters"]
    assert set(deployment["parameters"]) <= set(schema["properties"]), deployment["parameters"]
    params = {**deployment["parameters"], "out": "s3://genmodels/outputs/run-1/"}
    flow.validate_parameters(params)
    # The flow's own spec check (before MLflow is asked) accepts the deployment's values.
    from genmodels import bulk

    bulk.JobSpec(model=params["model"], version="?", n=params["n"], output=params["out"],
                 format=params["format"])
    # Models are registered as <dataset>-<family>: a bare family name resolves to nothing.
    from genmodels.cli_options import DATASETS
    from genmodels.models import FAMILIES
    from genmodels.registry import registered_name

    assert params["model"] in {registered_name(d, f) for d in DATASETS for f in FAMILIES}, params["model"]


def test_every_parameter_set_is_accepted_by_the_flow(retrain_deployments: dict):
    flow = _load_entrypoint(RETRAIN_ENTRYPOINT)
    for name, deployment in retrain_deployments.items():
        # A schedule's own parameters are merged over the deployment's at run time.
        variants = [deployment["parameters"]] + [
            {**deployment["parameters"], **s.get("parameters", {})} for s in deployment.get("schedules") or []
        ]
        for params in variants:
            try:
                flow.validate_parameters(params)
            except Exception as exc:  # Prefect raises several types; the message is what matters
                pytest.fail(f"{name}: parameters {params} rejected by the flow: {exc}")
            families = params["families"]
            assert families == "all" or set(families.split(",")) <= set(FAMILIES), (name, families)


def test_nightly_schedule_is_a_valid_utc_cron(deployments: dict):
    from prefect.client.schemas.schedules import CronSchedule

    schedules = deployments["retrain-all"]["schedules"]
    assert [(s["cron"], s["timezone"]) for s in schedules] == [("0 3 * * *", "UTC")]
    for deployment in deployments.values():
        for s in deployment.get("schedules") or []:
            # Raises on a malformed cron string or an unknown IANA zone.
            CronSchedule(cron=s["cron"], timezone=s.get("timezone"))


def test_every_deployment_targets_the_genmodels_work_pool(deployments: dict):
    for name, deployment in deployments.items():
        assert deployment["work_pool"]["name"] == WORK_POOL, name


def test_pull_steps_name_existing_prefect_steps(project: dict):
    for step in project["pull"]:
        (fqn,) = step
        module, _, function = fqn.rpartition(".")
        assert callable(getattr(importlib.import_module(module), function, None)), fqn


# ---------------------------------------------------------------------------------------------
# KubeRay RayJob and its Secret


def _cluster(manifest: dict) -> dict:
    """The RayCluster spec of a RayJob (`rayClusterSpec`) or a RayService (`rayClusterConfig`)."""
    spec = manifest["spec"]
    return spec["rayClusterSpec"] if manifest["kind"] == "RayJob" else spec["rayClusterConfig"]


def _containers(manifest: dict) -> list[dict]:
    cluster = _cluster(manifest)
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    return [c for t in templates for c in t["spec"]["containers"]]


def _entrypoint_argv(rayjob: dict) -> list[str]:
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:1] == ["genmodels"], f"RayJob entrypoint is not a genmodels command: {argv}"
    return argv


def test_rayjob_kind_and_version(rayjob: dict):
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    # The cluster runs the image's ray; a mismatch with the version declared to KubeRay (and
    # with the one pinned for the project) breaks the job at submission.
    installed = importlib.metadata.version("ray").split(".")[:2]
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"].split(".")[:2] == installed


def test_rayjob_entrypoint_is_a_valid_genmodels_retrain_command(rayjob: dict):
    from genmodels.cli import app

    argv = _entrypoint_argv(rayjob)
    # Typer's command objects (click's API; recent Typer vendors click, so no isinstance).
    root = typer.main.get_command(app)
    assert argv[1] in root.commands, f"`genmodels {argv[1]}` does not exist; commands: {sorted(root.commands)}"
    command = root.commands[argv[1]]
    assert argv[1] == "retrain"
    known = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
    used = {a.split("=", 1)[0] for a in argv[2:] if a.startswith("-")}
    assert used <= known, f"`genmodels retrain` has no option(s) {sorted(used - known)}; it has {sorted(known)}"
    # Parsing (without running) also checks values: types, choices, required options.
    try:
        ctx = command.make_context("retrain", list(argv[2:]))
    except Exception as exc:  # click's usage errors; the message names the bad option
        pytest.fail(f"`{rayjob['spec']['entrypoint']}` does not parse: {exc}")
    by_option = {opt: p.name for p in command.params for opt in p.opts}
    assert ctx.params[by_option["--preset"]] == "full"
    families = ctx.params[by_option["--family"]]
    assert families == "all" or set(families.split(",")) <= set(FAMILIES), families


def test_rayjob_workers_match_the_worker_replicas(rayjob: dict):
    from genmodels.cli import app

    command = typer.main.get_command(app).commands["retrain"]
    by_option = {opt: p.name for p in command.params for opt in p.opts}
    workers = command.make_context("retrain", _entrypoint_argv(rayjob)[2:]).params[by_option["--workers"]]
    replicas = sum(g["replicas"] for g in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    assert workers == replicas == 2


def test_rayjob_cleans_up_its_cluster(rayjob: dict):
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert spec["submissionMode"] in {"K8sJobMode", "HTTPMode"}


def test_every_container_runs_the_project_image_with_bounded_resources(rayjob: dict):
    containers = _containers(rayjob)
    assert len(containers) == 2  # one head template, one worker-group template
    for c in containers:
        assert c["image"] == "genmodels:latest", c["name"]
        for kind in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                assert c["resources"][kind].get(resource), f"{c['name']}: no {resource} {kind}"
        # requests == limits (Guaranteed QoS): Ray sizes itself from the limits, so anything
        # less than them as a request lets the node overcommit what Ray believes it has.
        assert c["resources"]["requests"] == c["resources"]["limits"], c["name"]


def test_every_container_reads_the_settings_secret(rayjob: dict, secret: dict):
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == SECRET_NAME
    for c in _containers(rayjob):
        refs = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
        assert refs == [SECRET_NAME], f"{c['name']}: envFrom secrets {refs}"


def test_every_setting_the_entrypoint_needs_is_provided(rayjob: dict, secret: dict):
    argv = _entrypoint_argv(rayjob)
    needed = set(RETRAIN_SETTINGS)
    if not any(a == "--out" or a.startswith("--out=") or a == "-o" for a in argv):
        needed.add("GENMODELS_STORAGE")
    if "--source" not in argv:
        needed.add("GENMODELS_FASHION_MNIST_DIR")
    secret_keys = set(secret["stringData"])
    for c in _containers(rayjob):
        provided = secret_keys | {e["name"] for e in c.get("env", [])}
        assert needed <= provided, f"{c['name']}: settings missing: {sorted(needed - provided)}"
        # The Ray Jobs driver is given the address of its own cluster; any RAY_ADDRESS from
        # the manifest would point the training somewhere else.
        assert "RAY_ADDRESS" not in provided, c["name"]
    # Pods are deleted after the job: results must go to object storage, not a pod's disk.
    assert secret["stringData"]["GENMODELS_STORAGE"].startswith("s3://")


def test_the_datasets_the_secret_names_are_in_the_image(secret: dict):
    # A local path must be the image's own copy (installed by its Dockerfile), or prep finds nothing.
    where = secret["stringData"]["GENMODELS_FASHION_MNIST_DIR"]
    assert where == "/usr/share/datasets/fashion-mnist"
    assert "dataset-fashion-mnist" in (INFRA / "Dockerfile").read_text()


def test_secret_example_holds_only_placeholders(secret: dict):
    values = secret["stringData"]
    assert all(isinstance(v, str) for v in values.values()), "stringData values must all be strings"
    assert values["AWS_ACCESS_KEY_ID"] == values["AWS_SECRET_ACCESS_KEY"] == "REPLACE_ME"
    assert "data" not in secret  # base64 `data` would hide what is committed from review


# ---------------------------------------------------------------------------------------------
# KubeRay RayService: the serving application on a cluster


def _serve_config(rayservice: dict) -> dict:
    text = rayservice["spec"]["serveConfigV2"]
    assert isinstance(text, str), "serveConfigV2 must be a YAML string (a block scalar), not a mapping"
    return yaml.safe_load(text)


def test_rayservice_kind_and_version_match_the_rayjob(rayservice: dict, rayjob: dict):
    assert (rayservice["apiVersion"], rayservice["kind"]) == ("ray.io/v1", "RayService")
    assert _cluster(rayservice)["rayVersion"] == _cluster(rayjob)["rayVersion"]


def test_rayservice_serves_the_applications_of_serving_config_yaml(rayservice: dict):
    served = _serve_config(rayservice)
    local = _load(SERVE_CONFIG_FILE)
    # The same application, deployments, autoscaling and args: one definition of the service.
    assert served["applications"] == local["applications"]
    assert served.get("proxy_location", "EveryNode") == local.get("proxy_location", "EveryNode")
    # Only where the proxy listens differs: a pod's proxy must be reachable from its Service.
    assert served["http_options"] == {**local["http_options"], "host": "0.0.0.0"}


def test_rayservice_serve_config_is_accepted_by_serve_and_build_app(rayservice: dict):
    from ray.serve.schema import ServeDeploySchema

    from serving.app import resolve_args

    config = ServeDeploySchema.model_validate(_serve_config(rayservice))
    (app,) = config.applications
    module, _, attr = app.import_path.partition(":")
    assert callable(getattr(importlib.import_module(module), attr, None)), app.import_path
    resolve_args(app.args)  # raises on an unknown or out-of-range arg
    ports = {p["name"]: p["containerPort"] for c in _containers(rayservice) for p in c.get("ports", [])}
    assert ports["serve"] == config.http_options.port


def test_rayservice_pods_run_the_rayjob_image_with_bounded_resources(rayservice: dict, rayjob: dict):
    images = {c["image"] for c in _containers(rayjob)}
    containers = _containers(rayservice)
    assert len(containers) == 2  # one head template, one worker-group template
    for c in containers:
        assert {c["image"]} == images, c["name"]
        for kind in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                assert c["resources"][kind].get(resource), f"{c['name']}: no {resource} {kind}"
        assert c["resources"]["requests"] == c["resources"]["limits"], c["name"]
    groups = _cluster(rayservice)["workerGroupSpecs"]
    assert groups and all(g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] for g in groups)


def test_rayservice_pods_read_the_settings_secret_and_what_serving_needs(rayservice: dict, secret: dict):
    # Replicas resolve models:/<name>@champion in MLflow and read its S3 artifacts.
    needed = {"MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
              "GENMODELS_WORK_DIR"}
    for c in _containers(rayservice):
        refs = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
        assert refs == [SECRET_NAME], f"{c['name']}: envFrom secrets {refs}"
        provided = set(secret["stringData"]) | {e["name"] for e in c.get("env", [])}
        assert needed <= provided, f"{c['name']}: settings missing: {sorted(needed - provided)}"
        assert "RAY_ADDRESS" not in provided, c["name"]
        from serving.app import SERVE_ENV

        values = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert {k: values.get(k) for k in SERVE_ENV} == SERVE_ENV, f"{c['name']}: Serve settings"



# ---------------------------------------------------------------------------------------------
# Ray's control plane on Kubernetes: token auth on every node, a NetworkPolicy around it

NETWORK_POLICY_FILE = INFRA / "k8s" / "networkpolicy.yaml"
RAY_CONTROL_PORTS = (6379, 8265, 10001)


def _pod_templates(manifest: dict) -> list[dict]:
    cluster = _cluster(manifest)
    return [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]


@pytest.mark.parametrize("name", ["rayjob", "rayservice"])
def test_every_ray_container_uses_token_auth_from_the_secret(request, name: str, secret: dict):
    for c in _containers(request.getfixturevalue(name)):
        env = {e["name"]: e for e in c.get("env", [])}
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{name}/{c['name']}: no RAY_AUTH_MODE=token"
        # From the Secret by key (not envFrom alone): a Secret without the token stops the pod
        # from starting instead of starting it without auth.
        assert env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef") == \
            {"name": SECRET_NAME, "key": "RAY_AUTH_TOKEN"}, f"{name}/{c['name']}: RAY_AUTH_TOKEN"
    assert secret["stringData"]["RAY_AUTH_TOKEN"] == "REPLACE_ME"


def _admits(rule: dict, port: int) -> bool:
    ports = rule.get("ports")
    return not ports or any(p.get("port") == port for p in ports)


def test_the_rayjob_submitter_reaches_the_dashboard_with_the_token(rayjob: dict):
    """KubeRay's default submitter pod has neither the policy's label nor the token: it would wait out
    activeDeadlineSeconds behind the NetworkPolicy, or be refused by the dashboard (401)."""
    template = rayjob["spec"]["submitterPodTemplate"]
    labels = template["metadata"]["labels"]
    rules = _load(NETWORK_POLICY_FILE)["spec"]["ingress"]
    assert any(_admits(r, 8265) and any(p.get("podSelector", {}).get("matchLabels", {}).items() <= labels.items()
                                        and "namespaceSelector" not in p for p in r.get("from", []))
               for r in rules), f"no ingress rule admits the submitter {labels} to the dashboard"
    (submitter,) = template["spec"]["containers"]
    assert submitter["image"] == "genmodels:latest" and template["spec"]["restartPolicy"] == "Never"
    env = {e["name"]: e for e in submitter["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": SECRET_NAME, "key": "RAY_AUTH_TOKEN"}
    assert "command" not in submitter  # KubeRay builds `ray job submit` from the entrypoint


def test_the_network_policy_keeps_rays_control_plane_to_the_cluster_and_its_drivers(rayjob: dict, rayservice: dict):
    policy = _load(NETWORK_POLICY_FILE)
    assert (policy["apiVersion"], policy["kind"]) == ("networking.k8s.io/v1", "NetworkPolicy")
    assert "Ingress" in policy["spec"]["policyTypes"]
    selected = policy["spec"]["podSelector"]["matchLabels"]
    for manifest in (rayjob, rayservice):
        for template in _pod_templates(manifest):
            labels = template.get("metadata", {}).get("labels", {})
            assert selected.items() <= labels.items(), f"a pod template outside the policy: {labels}"
    rules = policy["spec"]["ingress"]
    for port in RAY_CONTROL_PORTS:
        admitting = [r for r in rules if _admits(r, port)]
        assert admitting, f"port {port}: not even the cluster's own pods get in"
        for rule in admitting:
            peers = rule.get("from")
            assert peers, f"port {port} is open to every source: {rule}"
            for peer in peers:
                assert "ipBlock" not in peer, f"port {port}: an IP range gets in: {peer}"
                # Every peer names the pods it lets in (an empty selector would mean all of them).
                assert peer.get("podSelector", {}).get("matchLabels"), f"port {port}: unlabelled peer {peer}"
    api = [r for r in rules if _admits(r, 8000)]
    assert any(not r.get("from") for r in api), "the sampling API (8000) must stay reachable through its Service"
