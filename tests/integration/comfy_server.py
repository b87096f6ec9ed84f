"""Start and talk to a real ComfyUI for the integration tests (fixtures in conftest.py).

    COMFYUI_PATH=/work/ComfyUI COMFYUI_PYTHON=/work/venv/bin/python pytest tests/integration

The server runs from ComfyUI's checkout with its own --base-directory (a temporary folder): this
repository is its only custom node pack (linked as custom_nodes/ComfyUI-G4Seg, so whatever else
is installed in the checkout cannot stand in for it), input/output/temp/user are fresh, and
models/ is the checkout's, where tools/make_test_comfy_models.py writes random-weight test models.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid


COMFY = os.environ.get("COMFYUI_PATH")
PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOW_TO_RUN = ("set COMFYUI_PATH to a ComfyUI checkout (and COMFYUI_PYTHON to its Python), e.g. "
              "COMFYUI_PATH=/work/ComfyUI COMFYUI_PYTHON=/work/venv/bin/python pytest tests/integration")

CKPT = "g4seg_test_sd21_tiny.safetensors"
CLIP_VISION = "g4seg_test_vitl14.safetensors"
CLIP_VISION_H = "g4seg_test_vith14.safetensors"
CONTROLNET = "g4seg_test_controlnet_sd21_tiny.safetensors"


def comfy_available():
    if not COMFY or not os.path.exists(os.path.join(COMFY, "main.py")):
        return False, f"COMFYUI_PATH is not set to a ComfyUI checkout: {HOW_TO_RUN}"
    if subprocess.run([PYTHON, "-c", "import torch, aiohttp"], cwd=COMFY, capture_output=True).returncode != 0:
        return False, f"{PYTHON} cannot run ComfyUI: {HOW_TO_RUN}"
    return True, ""


def ensure_test_models():
    """Random-weight SD2.1 test models in the checkout's models/ (built once, reused)."""
    folder = os.path.join(COMFY, "models")
    wanted = [("checkpoints", CKPT), ("clip_vision", CLIP_VISION), ("clip_vision", CLIP_VISION_H),
              ("controlnet", CONTROLNET)]
    if not all(os.path.exists(os.path.join(folder, sub, name)) for sub, name in wanted):
        subprocess.run([PYTHON, os.path.join(ROOT, "tools", "make_test_comfy_models.py"), "--size", "tiny", "--vith"],
                       check=True, env=comfy_env(), timeout=1800)
    return folder


def comfy_env():
    return dict(os.environ, COMFYUI_PATH=COMFY or "", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_comfyui(base, log_path, *, python_args=(), timeout=300):
    """main.py --cpu on a free port with `base` as --base-directory; returns (process, url, object_info).

    python_args run before main.py (e.g. ["-c", code] that installs an import blocker and runs main.py)."""
    port = _free_port()
    log = open(log_path, "w")
    args = list(python_args) or ["main.py"]
    proc = subprocess.Popen([PYTHON, *args, "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                             "--disable-auto-launch", "--base-directory", str(base)],
                            cwd=COMFY, stdout=log, stderr=subprocess.STDOUT, env=comfy_env())
    url = f"http://127.0.0.1:{port}"
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            log.close()
            raise RuntimeError(f"ComfyUI exited: {open(log_path).read()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/object_info", timeout=10) as r:
                return proc, url, json.load(r), log
        except Exception:
            time.sleep(1)
    stop_comfyui(proc, log)
    raise RuntimeError(f"ComfyUI did not start in {timeout} s: {open(log_path).read()[-3000:]}")


def stop_comfyui(proc, log):
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def make_base(base, models_folder=None):
    """A --base-directory whose only custom node pack is this repository."""
    os.makedirs(os.path.join(base, "custom_nodes"))
    os.symlink(ROOT, os.path.join(base, "custom_nodes", "ComfyUI-G4Seg"))
    if models_folder:
        os.symlink(models_folder, os.path.join(base, "models"))
    for sub in ("input", "output", "temp", "user"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    return base


def get_json(url, timeout=30):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def post_json(url, data, timeout=60):
    req = urllib.request.Request(url, data=json.dumps(data).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
            return json.loads(body) if body else None
    except urllib.error.HTTPError as e:
        raise AssertionError(e.read().decode()[:4000]) from None


def upload_input(url, path, name=None):
    """POST /upload/image as the page's upload button does (multipart, into the input folder)."""
    boundary = uuid.uuid4().hex
    name = name or os.path.basename(path)
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + open(path, "rb").read() + \
        f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"overwrite\"\r\n\r\ntrue\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(url + "/upload/image", data=body,
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)


def wait_for_history(url, prompt_id, timeout=900):
    start = time.time()
    while time.time() - start < timeout:
        hist = get_json(f"{url}/history/{prompt_id}")
        if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
            return hist[prompt_id]
        time.sleep(1)
    raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s")
