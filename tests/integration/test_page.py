"""ComfyUI's real web page, as a user meets it (headless Chromium driven by playwright).

    COMFYUI_PATH=/work/ComfyUI COMFYUI_PYTHON=/work/venv/bin/python pytest tests/integration/test_page.py
    (Chromium: Debian's `chromium` package or G4SEG_CHROMIUM=/path; playwright: pip install playwright;
     G4SEG_PAGE_SHOTS=folder keeps screenshots)

For every workflow in example_workflows/ (found at collection, so new ones are covered):
* dropped onto the canvas as a file, and opened from the Templates browser (card click), it
  loads with no missing node, the page saves the same widgets_values it was given (the file
  is in the page's own layout), and the page's own prompt (app.graphToPrompt(), what Run
  sends) equals the quick model's (tests/test_workflows.ui_to_api);
* after the user's steps its Note names (upload assets/cat.png and assets/cat_coarse.png,
  pick the model files; the random-weight test models stand in), every value of the page's
  prompt is valid for /object_info (combo in its list, numbers in range and finite);
* Run (app.queuePrompt) is accepted by the server and the workflow runs to success (the SD2.1
  test model stands in for SD1.5/SDXL; SDXL itself: test_sdxl.py), and the refine nodes show
  their before/after picture.
An old-layout file (upload value after the file name) loads with its values in place.
"""

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from comfy_server import (CKPT, CLIP_VISION, CLIP_VISION_H, CONTROLNET, HOW_TO_RUN, PYTHON, get_json,  # noqa: E402
                         post_json, upload_input, wait_for_history)

sync_api = pytest.importorskip("playwright.sync_api", reason=f"playwright is not installed (pip install playwright); "
                                                             f"then {HOW_TO_RUN}")
CHROMIUM = os.environ.get("G4SEG_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"no Chromium ({CHROMIUM}): apt-get install chromium or set G4SEG_CHROMIUM; then {HOW_TO_RUN}",
                allow_module_level=True)

from test_workflows import ui_to_api, value_error  # noqa: E402

WORKFLOW_DIR = os.path.join(ROOT, "example_workflows")
WORKFLOWS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(WORKFLOW_DIR, "*.json")))
EMPTY_LORA = "g4seg_test_empty_lora.safetensors"
# What the user picks in each loader (the Note names the real files; random-weight stand-ins here).
PICKS = {"CheckpointLoaderSimple": {"ckpt_name": CKPT}, "CLIPVisionLoader": {"clip_name": CLIP_VISION},
         "ControlNetLoader": {"control_net_name": CONTROLNET}, "LoraLoaderModelOnly": {"lora_name": EMPTY_LORA},
         # CPU-friendly working sizes (a user on a small machine does the same)
         "G4SegRefine": {"size": 128}, "G4SegRefineClasses": {"size": 128},
         "G4SegTextToMask": {"short_side": 224, "templates": "single"}}
# Words -> mask matches SD2.1's 1024-d text tower with a 1024-d CLIP vision model (ViT-H/14).
PICKS_WORDS = {"CLIPVisionLoader": {"clip_name": CLIP_VISION_H}}
PREVIEW_NODES = ("G4SegRefine", "G4SegMixForeground", "G4SegDenseCRF")


def picks_for(wf):
    if any(n["type"] == "G4SegTextToMask" for n in wf["nodes"]):
        return dict(PICKS, **PICKS_WORDS)
    return PICKS


def _load(name):
    with open(os.path.join(WORKFLOW_DIR, name)) as f:
        return json.load(f)


def upload_assets(url, folder, width=150):
    """The uploads the Notes ask for, assets/cat.png and assets/cat_coarse.png, at 150 px wide (the CPU time
    of the VAE and CLIP grows with the picture; the user's own picture would do as well)."""
    from PIL import Image

    for name in ("cat.png", "cat_coarse.png"):
        with Image.open(os.path.join(ROOT, "assets", name)) as im:
            small = im.resize((width, round(im.height * width / im.width)),
                              Image.NEAREST if "coarse" in name else Image.LANCZOS)
            small.save(os.path.join(folder, name))
        upload_input(url, os.path.join(folder, name))


@pytest.fixture(scope="module")
def comfy(server, tmp_path_factory):
    """The server with the user's uploads (the files the Notes name) and a stand-in LoRA file."""
    upload_assets(server["url"], tmp_path_factory.mktemp("uploads"))
    # a returning user: a fresh user folder would open the Templates browser over the canvas at first load
    post_json(server["url"] + "/settings/Comfy.TutorialCompleted", True)
    loras = os.path.join(server["base"], "models", "loras")
    if not os.path.exists(os.path.join(loras, EMPTY_LORA)):
        from safetensors.torch import save_file
        save_file({}, os.path.join(loras, EMPTY_LORA))  # no weights: only lets the LoRA loader's graph run
    return dict(server, info=get_json(server["url"] + "/object_info"))


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture
def page(browser, comfy):
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(comfy["url"])
    page.wait_for_function("() => window.app?.graph && window.LiteGraph?.registered_node_types?.G4SegRefine",
                           timeout=120_000)
    page.wait_for_timeout(1000)
    page.g4seg_errors = errors
    yield page
    page.close()


def _shot(page, name):
    folder = os.environ.get("G4SEG_PAGE_SHOTS")
    if folder:
        os.makedirs(folder, exist_ok=True)
        page.screenshot(path=os.path.join(folder, name + ".png"))


def _drop(page, name, text):
    """A file dropped onto the canvas, as the browser delivers it."""
    page.evaluate("""([name, text]) => {
        const dt = new DataTransfer();
        dt.items.add(new File([text], name, {type: 'application/json'}));
        const canvas = document.querySelector('#graph-canvas');
        const r = canvas.getBoundingClientRect();
        for (const type of ['dragenter', 'dragover', 'drop'])
            canvas.dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true, cancelable: true,
                                                      clientX: r.x + r.width / 2, clientY: r.y + r.height / 2}));
    }""", [name, text])


def _wait_loaded(page, wf):
    ids = sorted(n["id"] for n in wf["nodes"])
    page.wait_for_function("ids => JSON.stringify(app.graph.nodes.map(n => n.id).sort((a, b) => a - b)) === "
                           "JSON.stringify(ids)", arg=ids, timeout=60_000)
    page.wait_for_timeout(500)


def _page_state(page):
    """(saved workflow, prompt) exactly as the page builds them for Save and Run."""
    return page.evaluate("async () => { const p = await app.graphToPrompt(); "
                         "return [JSON.parse(JSON.stringify(p.workflow)), p.output]; }")


def _missing_types(page):
    return page.evaluate("() => app.graph.nodes.filter(n => !LiteGraph.registered_node_types[n.type])"
                         ".map(n => n.type)")


def _check_loaded_as_shipped(page, wf):
    assert not _missing_types(page)
    saved, prompt = _page_state(page)
    shipped = {n["id"]: n.get("widgets_values", []) for n in wf["nodes"]}
    for node in saved["nodes"]:
        # widgets appended after the file was written follow the file's values with their defaults
        page_values = node.get("widgets_values", [])[:len(shipped[node["id"]])]
        assert page_values == shipped[node["id"]], \
            f"node {node['id']} {node['type']}: the page saves {node.get('widgets_values')}, the file has " \
            f"{shipped[node['id']]} (the file is not in the page's widget layout)"
    return prompt


def _strip(prompt):
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}


def _value_errors(prompt, info):
    """Every value the page sends, checked against the server's own declarations."""
    errors = []
    for node_id, node in prompt.items():
        declared = info[node["class_type"]]["input"]
        specs = {**declared.get("required", {}), **declared.get("optional", {})}
        where = f"node {node_id} {node['class_type']}"
        for name in declared.get("required", {}):
            if name not in node["inputs"]:
                errors.append(f"{where}: required input {name} missing")
        for name, value in node["inputs"].items():
            if name not in specs:
                errors.append(f"{where}: {name} is not an input of this node")
                continue
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                continue  # a link
            error = value_error(value, specs[name])
            if error:
                errors.append(f"{where}.{name}: {error}")
    return errors


def _pick_like_a_user(page, picks):
    page.evaluate("""picks => { for (const node of app.graph.nodes) {
        for (const [name, value] of Object.entries(picks[node.type] || {})) {
            const widget = node.widgets?.find(w => w.name === name);
            if (!widget) throw new Error(`${node.type} has no widget ${name}`);
            widget.value = value; widget.callback?.(value);
        } } }""", picks)


def _run_like_the_button(page):
    """app.queuePrompt, what Run does; returns the server's answer to the page's POST /prompt."""
    with page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST",
                              timeout=120_000) as response:
        page.evaluate("() => app.queuePrompt(0, 1)")
    return response.value.status, response.value.json()


@pytest.mark.parametrize("name", WORKFLOWS)
def test_dropped_workflow_gives_a_valid_prompt_and_runs(page, comfy, name):
    wf = _load(name)
    if any(n["type"] == "G4SegDenseCRF" for n in wf["nodes"]) and subprocess.run(
            [PYTHON, "-c", "import pydensecrf.densecrf"], capture_output=True).returncode != 0:
        # the node's optional package (requirements.txt): without it the node stops with the install hint
        pytest.skip(f"{name} needs pydensecrf2 in ComfyUI's Python: {PYTHON} -m pip install pydensecrf2")
    with open(os.path.join(WORKFLOW_DIR, name)) as f:
        _drop(page, name, f.read())
    _wait_loaded(page, wf)
    prompt = _check_loaded_as_shipped(page, wf)
    # the quick model of the page (CI without ComfyUI) must agree with the page itself
    assert _strip(prompt) == ui_to_api(wf, comfy["info"]), "tests/test_workflows.ui_to_api disagrees with the page"
    _pick_like_a_user(page, picks_for(wf))
    _, prompt = _page_state(page)
    errors = _value_errors(prompt, comfy["info"])
    assert not errors, "\n".join(errors)
    status, answer = _run_like_the_button(page)
    assert status == 200 and not answer.get("node_errors"), answer
    entry = wait_for_history(comfy["url"], answer["prompt_id"])
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:4000]
    cached = {n for kind, data in entry["status"].get("messages", []) if kind == "execution_cached"
              for n in data.get("nodes", [])}  # same inputs as an earlier run: not executed again
    for node_id, node in prompt.items():
        if node["class_type"] in PREVIEW_NODES and node_id not in cached:
            shown = entry["outputs"].get(node_id, {}).get("images", [])
            assert shown and all(im["type"] == "temp" for im in shown), f"{node['class_type']} showed no picture"
    page.evaluate("""types => { const node = app.graph.nodes.find(n => types.includes(n.type));
                                 if (node) { app.canvas.centerOnNode(node); app.canvas.setDirty(true, true); } }""",
                  list(PREVIEW_NODES))
    page.wait_for_timeout(1500)
    _shot(page, "ran_" + name[:-5])
    assert not page.g4seg_errors, page.g4seg_errors


def test_templates_are_listed_and_served(comfy):
    listed = get_json(comfy["url"] + "/workflow_templates").get("ComfyUI-G4Seg", [])
    assert sorted(listed) == sorted(n[:-5] for n in WORKFLOWS)
    import urllib.request
    for name in listed:
        for ext, kind in ((".json", "application/json"), (".jpg", "image/jpeg")):
            with urllib.request.urlopen(f"{comfy['url']}/api/workflow_templates/ComfyUI-G4Seg/{name}{ext}") as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith(kind), (name, ext)
                if ext == ".json":
                    assert json.load(r) == _load(name + ".json")


@pytest.mark.parametrize("name", WORKFLOWS)
def test_template_opens_from_the_templates_browser(page, comfy, name):
    wf = _load(name)
    page.locator("button[aria-label*=Templates i], .templates-tab-button").first.click()
    page.get_by_text("ComfyUI-G4Seg", exact=True).first.click()
    page.get_by_text(name[:-5], exact=True).first.click()
    _wait_loaded(page, wf)
    _shot(page, "template_" + name[:-5])
    prompt = _check_loaded_as_shipped(page, wf)
    assert _strip(prompt) == ui_to_api(wf, comfy["info"])
    _pick_like_a_user(page, picks_for(wf))
    errors = _value_errors(_page_state(page)[1], comfy["info"])
    assert not errors, "\n".join(errors)


def test_old_layout_of_load_coarse_mask_is_migrated(page, comfy):
    """Files saved before the fix stored the upload button's value ("image") after the file name."""
    name = "g4seg_refine_all_in_one.json"
    wf = _load(name)
    old = json.loads(json.dumps(wf))
    for node in old["nodes"]:
        if node["type"] == "G4SegLoadCoarseMask":
            node["widgets_values"].insert(1, "image")
    _drop(page, "old_" + name, json.dumps(old))
    _wait_loaded(page, old)
    _, prompt = _page_state(page)
    assert _strip(prompt) == ui_to_api(wf, comfy["info"])
