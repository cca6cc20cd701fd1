"""Issue 20, sections 3, 6 and the start-up case of 4, against real ``flashtune serve`` and ``flashtune worker``
processes (the uploads of sections 2 and 4 are in ``test_hostile_uploads.py``).

* A base model shaped like a hub id loads only from the hub cache (``HF_HOME``), never from a folder of that name
  under the worker's working directory; a failed load tells the caller a generic message with a hint (the same one
  whether or not such a folder exists) and the operator's log the reason.
* A downloaded adapter names its base publicly (``testorg/tiny``): no file in the archive holds ``DATA_DIR``, the hub
  cache or any other server path, and the server still serves it.
* Ids alias nothing: Unicode digits, ``1_0``, ``01``, a trailing newline. Request bodies convert nothing: for every
  number and boolean field the live schema publishes, ``true``/``"1"`` (or ``1``/``"true"``) is a 422 naming it.
* No redirect to another host (the slash redirect built from ``Host`` is off); a 405's ``Allow`` lists every method
  of the path, as the schema declares them.
* ``flashtune serve`` removes the SQLite import copies that killed servers left, and keeps a live one's.
* A DATA_DIR that cannot be used stops ``serve`` and ``worker`` with one line on stderr and exit status 1.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.llm.builtin.data import builtin_dataset
from tests.conftest import ROOT, Service, hub_snapshot, seed_builtin

KEY = "hostile-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
HUB_REPO, CWD_REPO = "testorg/tiny", "evilorg/model"  # in the hub cache; only a folder under the working directory


class CwdService(Service):
    """A Service whose processes run in ``cwd`` (the conftest's run in the repository)."""

    def __init__(self, data_dir: Path, cwd: Path, env: dict[str, str]) -> None:
        super().__init__(data_dir, env)
        self.cwd = cwd

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        log = (self.data_dir / log_name).open("ab")
        command = [sys.executable, "-m", "service.cli", *args]
        return subprocess.Popen(command, env=self.env, stdout=log, stderr=log, cwd=self.cwd)


def start(root: Path, cache: Path, base_model: str, workers: int = 0, **env: str) -> CwdService:
    """Services in ``root``: DATA_DIR ``root/data``, hub cache ``root/hf`` (``HUB_REPO`` in it), a working directory
    ``root/cwd`` holding a real model at ``CWD_REPO``, temporary files in ``root/tmp``."""
    for folder in ("data", "hf/hub", "cwd", "tmp"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    if not (root / "cwd" / CWD_REPO).exists():
        shutil.copytree(cache, root / "cwd" / CWD_REPO)
        hub_snapshot(root / "hf" / "hub", HUB_REPO, cache)
    seed_builtin(root / "data", cache)
    settings = {"FLASHTUNE_API_KEY": KEY, "FLASHTUNE_BASE_MODEL": base_model, "HF_HOME": str(root / "hf")}
    svc = CwdService(root / "data", root / "cwd", {**settings, "TMPDIR": str(root / "tmp"), **env})
    svc.client.headers.update(AUTH)
    svc.start_api()
    for _ in range(workers):
        svc.start_worker()
    return svc


def server_paths(root: Path) -> list[str]:
    return [str(root), str(root.resolve()), str(ROOT), sys.prefix, "/tmp/", "/root/"]


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def dead_and_live_pid() -> Iterator[tuple[int, int]]:
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    yield int(ended.stdout), alive.pid
    alive.kill()
    alive.wait()


@pytest.fixture(scope="module")
def api(
    tmp_path_factory: pytest.TempPathFactory, builtin_model_cache: Path, dead_and_live_pid: tuple[int, int]
) -> Iterator[CwdService]:
    """``flashtune serve`` alone, serving ``CWD_REPO``: a hub id whose only copy is the folder in its working
    directory. Import copies of a killed server and of a live one are planted in its temporary folder first."""
    root = tmp_path_factory.mktemp("hostile")
    (root / "tmp").mkdir()
    dead, live = dead_and_live_pid
    for pid in (dead, live):
        (root / "tmp" / f"flashtune-import-{pid}-x1y2z3.db").write_bytes(b"SQLite format 3\x00" + b"\x00" * 4000)
    svc = start(root, builtin_model_cache, base_model=CWD_REPO)
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory, builtin_model_cache: Path) -> Iterator[CwdService]:
    """An API and a worker serving ``HUB_REPO`` from the hub cache."""
    svc = start(tmp_path_factory.mktemp("hostile-train"), builtin_model_cache, base_model=HUB_REPO, workers=1)
    yield svc
    svc.stop()


# ------------------------------------------------------------------------------------------- §3: base models
def test_a_hub_id_never_loads_a_folder_under_the_working_directory(api: CwdService, trainer: CwdService) -> None:
    """The server's own base ``CWD_REPO`` exists only as ``cwd/evilorg/model``: /analyze answers 503 with a generic
    message. Jobs on it and on a name no folder has fail alike, and the worker's log has the reason."""
    root = api.data_dir.parent
    response = api.client.post("/analyze", json={"text": "美联储宣布加息25个基点", "adapter": "none"})
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["type"] == "model_unavailable" and "HF_HOME" in error["message"]
    for leak in server_paths(root):
        assert leak not in response.text, leak
    errors = []
    for name in (CWD_REPO, "evilorg/missing"):
        job = trainer.wait(trainer.post_job(base_model=name)["id"], timeout=600)
        assert job["status"] == "failed" and job["error"]["type"] == "base_model_error", job
        errors.append({k: str(v).replace(name, "NAME") for k, v in job["error"].items()})
        for leak in server_paths(trainer.data_dir.parent):
            assert leak not in json.dumps(job["error"]), (leak, job["error"])
    assert errors[0] == errors[1]  # the caller cannot tell that one of them exists as a folder
    assert "LocalEntryNotFoundError" in trainer.logs()  # the reason, for the operator


# ------------------------------------------------------------------------------------ §6: what leaves the server
def small_dataset(count: int = 24) -> bytes:
    train, _ = builtin_dataset()
    rows = ({"instruction": e.instruction, "input": e.input, "output": e.output} for e in train[:count])
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


def test_a_downloaded_adapter_names_its_base_not_the_server(trainer: CwdService) -> None:
    upload = trainer.client.post("/datasets", files={"file": ("small.jsonl", small_dataset())})
    assert upload.status_code == 201, upload.text
    hyperparameters = {"epochs": 1, "batch_size": 8, "max_length": 128}
    job = trainer.post_job(dataset=upload.json()["id"], hyperparameters=hyperparameters)
    job = trainer.wait(job["id"], timeout=900)
    assert job["status"] == "succeeded", (job, trainer.logs())
    archive = trainer.client.get(f"/adapters/{job['adapter']}/download")
    assert archive.status_code == 200
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
        for member in tar.getmembers():
            stream = tar.extractfile(member)
            if stream is not None:
                files[member.name.split("/", 1)[1]] = stream.read()
    assert {"adapter_config.json", "README.md", "training_info.json", "adapter_model.safetensors"} <= set(files)
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == HUB_REPO
    assert json.loads(files["training_info.json"])["base_model"] == HUB_REPO
    assert f"base_model: {HUB_REPO}" in files["README.md"].decode()
    root = trainer.data_dir.parent
    for name, content in files.items():
        for leak in server_paths(root):
            assert leak.encode() not in content, (name, leak)
    served = trainer.client.post("/analyze", json={"text": "美联储宣布加息25个基点", "adapter": job["adapter"]})
    assert served.status_code == 200, served.text  # the server still finds the base: through the hub cache
    assert served.json()["base_model"] == HUB_REPO


def test_ids_with_other_digits_or_spellings_alias_nothing(api: CwdService) -> None:
    job = api.post_job(dataset="builtin", base_model="builtin")
    number = job["id"]
    assert api.client.get(f"/jobs/{number}").status_code == 200
    assert api.client.get(f"/v1/fine_tuning/jobs/ftjob-{number}").status_code == 200
    digits = str(number).translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"))  # Arabic-Indic
    wide = str(number).translate(str.maketrans("0123456789", "０１２３４５６７８９"))  # fullwidth
    for alias in (digits, wide, f"0{number}", f"+{number}", f"{number}%0A", f"%20{number}"):
        assert api.client.get(f"/jobs/{alias}").status_code in (404, 422), alias
        assert api.client.get(f"/v1/fine_tuning/jobs/ftjob-{alias}").status_code == 404, alias
    assert api.client.get("/jobs/1_0").status_code == 422  # not job 10
    for name in (f"job-{digits}", f"job-{number}%0A", f"job-0{number}"):
        assert api.client.get(f"/adapters/{name}").status_code == 404, name
    analyze = api.client.post("/analyze", json={"text": "x", "adapter": f"job-{digits}"})
    assert analyze.status_code == 404, analyze.text
    for value in ("1_0", "+1", "١", "1\u00a0"):  # '١' is sent as UTF-8 bytes; it must not read as 1
        headers = [(b"Last-Event-ID", value.encode())]
        response = api.client.get(f"/jobs/{number}/events?stream=true", headers=headers)
        assert response.status_code == 422, (value, response.text)
    api.client.post(f"/jobs/{number}/cancel")


def json_fields(schema: dict[str, Any], node: dict[str, Any], path: str, depth: int = 0) -> Iterator[tuple[str, str]]:
    """(dotted field path, kind) of each property of ``node`` that takes only numbers or only booleans (besides
    null), following ``$ref``s into nested objects."""
    node = resolve(schema, node)
    for name, prop in node.get("properties", {}).items():
        branches = [resolve(schema, b) for b in prop.get("anyOf", [prop])]
        kinds = {b.get("type") for b in branches} - {"null"}
        field = f"{path}{name}"
        if kinds and kinds <= {"integer", "number"}:
            yield field, "number"
        elif kinds == {"boolean"}:
            yield field, "boolean"
        elif depth < 2:
            for branch in branches:
                if branch.get("type") == "object" or "properties" in branch:
                    yield from json_fields(schema, branch, f"{field}.", depth + 1)


def resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
    return node


def nested(path: str, value: object) -> dict[str, Any]:
    head, _, rest = path.partition(".")
    return {head: nested(rest, value) if rest else value}


def test_request_bodies_convert_no_json_value(api: CwdService) -> None:
    """Every number and boolean field of every JSON request body in the live schema: a value of another JSON type
    is refused with a 4xx naming the field, never read as a number or a boolean."""
    schema = api.client.get("/openapi.json").json()
    checked = []
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            body = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if body is None or "{" in path:
                continue
            for field, kind in json_fields(schema, body["schema"], ""):
                for wrong in (True, "1") if kind == "number" else (1, "true"):
                    response = api.client.request(method, path, json=nested(field, wrong))
                    assert response.status_code in (400, 422), (method, path, field, wrong, response.text)
                    named = [d.get("field", "") for d in response.json()["error"].get("details") or []]
                    assert any(n == field or n.startswith(field + ".") for n in named), (path, field, response.text)
                checked.append(f"{method.upper()} {path} {field}")
    for expected in ("POST /jobs hyperparameters.epochs", "POST /analyze max_new_tokens"):
        assert expected in checked, checked


def test_no_redirect_to_another_host(api: CwdService) -> None:
    """Starlette's slash redirect was an absolute URL built from the Host header: /jobs/ with 'Host: evil.example'
    answered 307 to http://evil.example/jobs. Sent as is (http.client keeps '//' and the Host given)."""
    for path in ("/jobs/", "/datasets/", "/analyze/", "/v1/models/", "//evil.example/jobs", "//evil.example/jobs/"):
        connection = http.client.HTTPConnection("127.0.0.1", api.port, timeout=60)
        connection.putrequest("GET", path, skip_host=True)
        for name, value in {"Host": "evil.example", **AUTH}.items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 404 and response.getheader("location") is None, (path, response.getheaders())
        connection.close()


def test_405_lists_every_method_of_the_path(api: CwdService) -> None:
    schema = api.client.get("/openapi.json").json()
    for path, item in schema["paths"].items():
        declared = {m.upper() for m in item if m in ("get", "put", "post", "delete", "patch")}
        concrete = path.replace("{", "").replace("}", "")  # any value will do for routing
        response = api.client.request("OPTIONS", concrete)
        assert response.status_code == 405, (path, response.status_code)
        allowed = {m.strip() for m in response.headers["allow"].split(",")} - {"HEAD"}
        assert allowed == declared, (path, response.headers["allow"], declared)


def test_import_copies_of_killed_servers_are_removed_at_start_up(
    api: CwdService, dead_and_live_pid: tuple[int, int]
) -> None:
    dead, live = dead_and_live_pid
    left = sorted(p.name for p in (api.data_dir.parent / "tmp").glob("flashtune-import-*"))
    assert left == [f"flashtune-import-{live}-x1y2z3.db"], left
    assert "left by an import that did not finish" in api.logs()


# ----------------------------------------------------------------------------------- §4: an unusable DATA_DIR
def unusable_data_dirs(tmp: Path) -> list[tuple[str, Path, list[str]]]:
    """(what, DATA_DIR, command prefix): an empty read-only folder (entered as nobody where the tests run as root,
    who may write anywhere) and a regular file."""
    read_only = tmp / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    tmp.chmod(0o755)
    prefix = []
    if os.geteuid() == 0:
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        for parent in (tmp, *tmp.parents):  # nobody must reach the folder to be refused by it
            parent.chmod(parent.stat().st_mode | 0o005)
        # ... and the checkout's virtualenv: a clone inside a private folder (`mktemp -d`, 0700) hid it from nobody,
        # whose python then started without the venv and found no module `service`
        for parent in Path(sys.prefix).parents:
            parent.chmod(parent.stat().st_mode | 0o001)
    a_file = tmp / "a-file"
    a_file.write_text("not a folder")
    return [("read-only", read_only, prefix), ("a file", a_file, [])]


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_an_unusable_data_dir_stops_start_up_with_one_line(command: str, tmp_path: Path) -> None:
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a read-only folder cannot be made unwritable")
    for what, data_dir, prefix in unusable_data_dirs(tmp_path):
        env = {**os.environ, "FLASHTUNE_DATA_DIR": str(data_dir), "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
        env.pop("FLASHTUNE_DATABASE_URL", None)
        done = subprocess.run(
            [*prefix, sys.executable, "-m", "service.cli", command],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 1, (what, done.returncode, done.stderr)
        assert len(lines) == 1 and "FLASHTUNE_DATA_DIR" in lines[0], (what, done.stderr)
        assert "Traceback" not in done.stderr and done.stdout == "", (what, done.stdout)


def test_the_api_stays_healthy(api: CwdService) -> None:
    assert httpx.get(f"{api.url}/healthz", timeout=30).status_code == 200
