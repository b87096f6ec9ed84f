"""Validate every shipped workflow (example_workflows/*.json, ComfyUI UI format) without ComfyUI.

Checks: each node type is ours or a core ComfyUI node listed in CORE_NODES (declarations
read off ComfyUI 0.8.0's /object_info); every link's type matches the declared output and
input types; widget values of our nodes are in range / among the choices; every workflow
has a same-name .jpg thumbnail.

This is a quick model of the page for CI without ComfyUI. It is NOT the authority on
widget order: tests/integration/test_page.py loads every workflow into ComfyUI's real
page and checks that the page's own prompt (app.graphToPrompt) equals ui_to_api's, so a
wrong assumption here fails there. What the model encodes (frontend 1.35, read from its
source): widgets follow /object_info's input_order (required, then optional); an
`image_upload` combo gets an upload button that is never saved (serialize: false) and is
skipped when widgets_values are loaded; `control_after_generate` adds one saved value.
"""

import glob
import json
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "example_workflows", "*.json")))
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
SEED_NAMES = ("seed", "noise_seed")
# Frontend-only nodes: no server class, never part of the prompt.
VIRTUAL_NODES = ("Note", "MarkdownNote", "Reroute", "PrimitiveNode")

# Core ComfyUI nodes the workflows may use: inputs (name, type[+control|+upload], optional), outputs.
CORE_NODES = {
    'CheckpointLoaderSimple': {'inputs': [('ckpt_name', 'COMBO', False)],
        'outputs': ['MODEL', 'CLIP', 'VAE']},
    'CLIPVisionLoader': {'inputs': [('clip_name', 'COMBO', False)],
        'outputs': ['CLIP_VISION']},
    'LoadImage': {'inputs': [('image', 'COMBO+upload', False)],
        'outputs': ['IMAGE', 'MASK']},
    'VAEEncode': {'inputs': [('pixels', 'IMAGE', False), ('vae', 'VAE', False)],
        'outputs': ['LATENT']},
    'VAEDecode': {'inputs': [('samples', 'LATENT', False), ('vae', 'VAE', False)],
        'outputs': ['IMAGE']},
    'PreviewImage': {'inputs': [('images', 'IMAGE', False)],
        'outputs': []},
    'MaskToImage': {'inputs': [('mask', 'MASK', False)],
        'outputs': ['IMAGE']},
    'SaveImage': {'inputs': [('images', 'IMAGE', False), ('filename_prefix', 'STRING', False)],
        'outputs': []},
    'GrowMask': {'inputs': [('mask', 'MASK', False), ('expand', 'INT', False), ('tapered_corners', 'BOOLEAN', False)],
        'outputs': ['MASK']},
    'FeatherMask': {'inputs': [('mask', 'MASK', False), ('left', 'INT', False), ('top', 'INT', False), ('right', 'INT', False), ('bottom', 'INT', False)],
        'outputs': ['MASK']},
    'VAEEncodeForInpaint': {'inputs': [('pixels', 'IMAGE', False), ('vae', 'VAE', False), ('mask', 'MASK', False), ('grow_mask_by', 'INT', False)],
        'outputs': ['LATENT']},
    'SetLatentNoiseMask': {'inputs': [('samples', 'LATENT', False), ('mask', 'MASK', False)],
        'outputs': ['LATENT']},
    'KSampler': {'inputs': [('model', 'MODEL', False), ('seed', 'INT+control', False), ('steps', 'INT', False), ('cfg', 'FLOAT', False), ('sampler_name', 'COMBO', False), ('scheduler', 'COMBO', False), ('positive', 'CONDITIONING', False), ('negative', 'CONDITIONING', False), ('latent_image', 'LATENT', False), ('denoise', 'FLOAT', False)],
        'outputs': ['LATENT']},
    'ControlNetLoader': {'inputs': [('control_net_name', 'COMBO', False)],
        'outputs': ['CONTROL_NET']},
    'ControlNetApplyAdvanced': {'inputs': [('positive', 'CONDITIONING', False), ('negative', 'CONDITIONING', False), ('control_net', 'CONTROL_NET', False), ('image', 'IMAGE', False), ('strength', 'FLOAT', False), ('start_percent', 'FLOAT', False), ('end_percent', 'FLOAT', False), ('vae', 'VAE', True)],
        'outputs': ['CONDITIONING', 'CONDITIONING']},
    'ModelSamplingDiscrete': {'inputs': [('model', 'MODEL', False), ('sampling', 'COMBO', False), ('zsnr', 'BOOLEAN', False)],
        'outputs': ['MODEL']},
    'LoraLoaderModelOnly': {'inputs': [('model', 'MODEL', False), ('lora_name', 'COMBO', False), ('strength_model', 'FLOAT', False)],
        'outputs': ['MODEL']},
    'CLIPTextEncode': {'inputs': [('text', 'STRING', False), ('clip', 'CLIP', False)],
        'outputs': ['CONDITIONING']},
    'ImageScale': {'inputs': [('image', 'IMAGE', False), ('upscale_method', 'COMBO', False), ('width', 'INT', False), ('height', 'INT', False), ('crop', 'COMBO', False)],
        'outputs': ['IMAGE']},
    'ImageToMask': {'inputs': [('image', 'IMAGE', False), ('channel', 'COMBO', False)],
        'outputs': ['MASK']},
    'EmptyLatentImage': {'inputs': [('width', 'INT', False), ('height', 'INT', False), ('batch_size', 'INT', False)],
        'outputs': ['LATENT']},
    'PreviewAny': {'inputs': [('source', '*', False)],
        'outputs': []},
}


def _core_object_info():
    info = {}
    for name, spec in CORE_NODES.items():
        inputs = {"required": {}, "optional": {}}
        for iname, itype, optional in spec["inputs"]:
            base, _, flag = itype.partition("+")
            opts = {}
            if flag == "control":
                opts["control_after_generate"] = True
            if flag == "upload":
                opts["image_upload"] = True
            inputs["optional" if optional else "required"][iname] = ["COMBO" if base == "COMBO" else base, opts]
        info[name] = {"input": inputs, "output": list(spec["outputs"]), "name": name}
    return info


def object_info_from_nodes():
    """object_info-like dict for our nodes (from their declarations) plus CORE_NODES."""
    from nodes import NODE_CLASS_MAPPINGS

    info = _core_object_info()
    for name, cls in NODE_CLASS_MAPPINGS.items():
        it = cls.INPUT_TYPES()
        inputs = {sec: {k: list(v) for k, v in it.get(sec, {}).items()} for sec in ("required", "optional")}
        info[name] = {"input": inputs, "output": list(cls.RETURN_TYPES), "name": name}
    return info


def _type_of(spec):
    t = spec[0]
    return "COMBO" if isinstance(t, list) else t


def _opts(spec):
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def value_error(value, spec):
    """Why a widget value does not fit its declared input spec ((type or choices, options)), or None.
    Shared with tests/integration/test_page.py, which checks the page's prompt against /object_info."""
    kind, opts = _type_of(spec), _opts(spec)
    if kind == "COMBO":
        choices = spec[0] if isinstance(spec[0], list) else opts.get("options", [])
        return None if value in choices else f"{value!r} is not one of {choices[:8]}"
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"{value!r} is not a finite number"
        if ("min" in opts and value < opts["min"]) or ("max" in opts and value > opts["max"]):
            return f"{value} outside [{opts.get('min')}, {opts.get('max')}]"
        if kind == "INT" and int(value) != value:
            return f"{value} is not an integer"
    if kind == "STRING" and not isinstance(value, str):
        return f"{value!r} is not a string"
    if kind == "BOOLEAN" and not isinstance(value, bool):
        return f"{value!r} is not a boolean"
    return None


def widget_slots(info_node):
    """[(input name, spec, number of widgets_values entries)] in the UI's widget order."""
    out = []
    for sec in ("required", "optional"):
        for name, spec in info_node["input"].get(sec, {}).items():
            t = _type_of(spec)
            if t not in WIDGET_TYPES:
                continue
            o = _opts(spec)
            n = 1
            if o.get("control_after_generate") or (t == "INT" and name in SEED_NAMES):
                n += 1
            out.append((name, spec, n))
    return out


def node_widget_values(node, info_node):
    """{input name: value} from a UI node's widgets_values (skipping control_after_generate values)."""
    values = list(node.get("widgets_values") or [])
    linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
    out, pos = {}, 0
    for name, spec, n in widget_slots(info_node):
        if pos >= len(values):
            break
        if name not in linked:
            out[name] = values[pos]
        pos += n
    return out, pos, len(values)


def widget_default(spec):
    """The value a widget has before anything is loaded into it."""
    kind, opts = spec[0], _opts(spec)
    if "default" in opts:
        return opts["default"]
    if isinstance(kind, list):
        return kind[0] if kind else None
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(kind)


def _links(workflow):
    return {l[0]: l for l in workflow.get("links", [])}


def ui_to_api(workflow, object_info):
    """UI-format workflow -> API prompt (what the page POSTs to /prompt)."""
    links = _links(workflow)
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4) or node["type"] in VIRTUAL_NODES:  # muted / bypassed / frontend-only
            continue
        info = object_info[node["type"]]
        inputs, _, _ = node_widget_values(node, info)
        linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        for name, spec, _ in widget_slots(info):  # widgets appended after the file was saved keep their default
            if name not in inputs and name not in linked:
                inputs[name] = widget_default(spec)
        for inp in node.get("inputs", []):
            if inp.get("link") is None:
                continue
            l = links[inp["link"]]
            inputs[inp["name"]] = [str(l[1]), l[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def _accepts(declared_in, link_type, out_type):
    if declared_in == "*" or out_type == "*":
        return True
    ins = set(str(declared_in).split(","))
    return link_type in ins and out_type in ins


def validate_workflow(workflow, object_info, check_widgets=True):
    errors = []
    graph_nodes = [n for n in workflow["nodes"] if n["type"] not in VIRTUAL_NODES]
    nodes = {n["id"]: n for n in graph_nodes}
    for node in graph_nodes:
        if node["type"] not in object_info:
            errors.append(f"node {node['id']}: unknown type {node['type']}")
    if errors:
        return errors
    for l in workflow.get("links", []):
        lid, src, sslot, dst, dslot, ltype = l[:6]
        if src not in nodes or dst not in nodes:
            errors.append(f"link {lid}: missing node")
            continue
        s_info, d_node = object_info[nodes[src]["type"]], nodes[dst]
        outs = s_info["output"]
        if sslot >= len(outs):
            errors.append(f"link {lid}: {nodes[src]['type']} has no output {sslot}")
            continue
        if dslot >= len(d_node.get("inputs", [])):
            errors.append(f"link {lid}: {d_node['type']} has no input slot {dslot}")
            continue
        inp = d_node["inputs"][dslot]
        if inp.get("link") != lid:
            errors.append(f"link {lid}: input {d_node['type']}.{inp['name']} does not point back to it")
        d_info = object_info[d_node["type"]]["input"]
        spec = d_info.get("required", {}).get(inp["name"]) or d_info.get("optional", {}).get(inp["name"])
        if spec is None:
            errors.append(f"link {lid}: {d_node['type']} has no input named {inp['name']}")
            continue
        if not _accepts(_type_of(spec), ltype, outs[sslot]):
            errors.append(f"link {lid}: {nodes[src]['type']}[{sslot}] {outs[sslot]} -> "
                          f"{d_node['type']}.{inp['name']} {_type_of(spec)} (link says {ltype})")
        src_out = nodes[src]["outputs"][sslot]
        if lid not in (src_out.get("links") or []):
            errors.append(f"link {lid}: not listed on {nodes[src]['type']} output {sslot}")
    for node in graph_nodes:
        info = object_info[node["type"]]
        linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        for sec in ("required",):
            for name, spec in info["input"].get(sec, {}).items():
                if _type_of(spec) not in WIDGET_TYPES and name not in linked:
                    errors.append(f"node {node['id']} {node['type']}: required input {name} is not connected")
        values, used, total = node_widget_values(node, info)
        if used != total:
            errors.append(f"node {node['id']} {node['type']}: {total} widget values, expected {used}")
        if not (check_widgets and node["type"].startswith("G4Seg")):
            continue
        specs = {n: s for n, s, _ in widget_slots(info)}
        for name, value in values.items():
            spec = specs[name]
            # Upload combos list the files of the server's input folder: not known here.
            if _type_of(spec) == "COMBO" and (spec[0] == [] or _opts(spec).get("image_upload")):
                continue
            error = value_error(value, spec)
            if error:
                errors.append(f"node {node['id']} {node['type']}.{name}: {error}")
    return errors


EXPECTED = ["g4seg_controlnet_seg.json", "g4seg_refine_all_in_one.json", "g4seg_refine_then_inpaint.json",
            "g4seg_sd21_node_by_node.json", "g4seg_sdxl_lcm.json"]


def test_all_workflows_shipped_with_thumbnails():
    names = [os.path.basename(p) for p in WORKFLOWS]
    for name in EXPECTED:
        assert name in names
    for path in WORKFLOWS:
        thumb = path[:-5] + ".jpg"
        assert os.path.exists(thumb), f"missing thumbnail {thumb}"
        from PIL import Image
        with Image.open(thumb) as im:
            assert im.format == "JPEG" and min(im.size) >= 64


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_workflow_validates(path):
    with open(path) as f:
        wf = json.load(f)
    assert wf.get("nodes") and isinstance(wf.get("links"), list)
    errors = validate_workflow(wf, object_info_from_nodes())
    assert not errors, "\n".join(errors)
    prompt = ui_to_api(wf, object_info_from_nodes())
    assert any(v["class_type"].startswith("G4Seg") for v in prompt.values())


def test_validator_catches_a_type_mismatch():
    with open(os.path.join(ROOT, "example_workflows", "g4seg_refine_all_in_one.json")) as f:
        wf = json.load(f)
    info = object_info_from_nodes()
    refine = next(n for n in wf["nodes"] if n["type"] == "G4SegRefine")
    bad = json.loads(json.dumps(wf))
    # retarget the MASK link into the IMAGE input
    r = next(n for n in bad["nodes"] if n["id"] == refine["id"])
    names = [i["name"] for i in r["inputs"]]
    r["inputs"][names.index("image")]["link"], r["inputs"][names.index("mask")]["link"] = \
        r["inputs"][names.index("mask")]["link"], r["inputs"][names.index("image")]["link"]
    for l in bad["links"]:
        if l[3] == r["id"] and l[4] in (names.index("image"), names.index("mask")):
            l[4] = names.index("mask") if l[4] == names.index("image") else names.index("image")
    assert validate_workflow(bad, info)
    worse = json.loads(json.dumps(wf))
    r = next(n for n in worse["nodes"] if n["id"] == refine["id"])
    r["widgets_values"][0] = ""  # class_name ok as a string, but break timestep:
    r["widgets_values"][1] = 5000
    assert any("outside" in e for e in validate_workflow(worse, info))


# ComfyUI serves a pack's templates from the FIRST of these folders that exists (app/custom_node_manager.py).
TEMPLATE_FOLDER_NAMES = ("example_workflows", "example", "examples", "workflow", "workflows")
LOADERS = {"CheckpointLoaderSimple": "ckpt_name", "CLIPVisionLoader": "clip_name", "ControlNetLoader": "control_net_name",
           "LoraLoaderModelOnly": "lora_name"}
FILE_INPUTS = {"LoadImage": "image", "G4SegLoadCoarseMask": "image"}


def test_templates_folder_is_not_shadowed():
    present = [name for name in TEMPLATE_FOLDER_NAMES if os.path.isdir(os.path.join(ROOT, name))]
    assert present == ["example_workflows"], f"ComfyUI would serve templates from {present[0]}/"


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_workflow_says_what_to_upload_and_pick(path):
    """Input files ship in assets/ and a Note names them; every model file the loaders name is in the Note."""
    with open(path) as f:
        wf = json.load(f)
    notes = [n for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert notes, "a Note node must say what to upload and which models to pick"
    text = "\n".join(str(v) for n in notes for v in n.get("widgets_values", []))
    info = object_info_from_nodes()
    for node in wf["nodes"]:
        if node["type"] in FILE_INPUTS:
            values, _, _ = node_widget_values(node, info[node["type"]])
            name = values[FILE_INPUTS[node["type"]]]
            assert os.path.exists(os.path.join(ROOT, "assets", name)), f"{node['type']} names {name}, not in assets/"
            assert f"assets/{name}" in text or f"assets folder" in text and name in text, f"the Note does not name {name}"
        if node["type"] in LOADERS:
            name = node["widgets_values"][0]
            assert name in text, f"the Note does not say which file {node['type']} wants ({name})"


def test_upload_button_is_the_last_widget_under_every_frontend():
    """The page adds an upload button for an `image_upload` combo at the end of the widgets: frontend 1.35 after
    all inputs (input_order: required, then optional), older frontends after the required ones. Old frontends
    saved its value. With no optional widget on an upload node, both places are the same (last), so saved
    values keep their positions under any frontend: append new widgets of such nodes to `required`."""
    from nodes import NODE_CLASS_MAPPINGS

    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        declared = cls.INPUT_TYPES()
        if not any(_opts(s).get("image_upload") for s in declared["required"].values()):
            continue
        optional_widgets = [n for n, s in declared.get("optional", {}).items() if _type_of(s) in WIDGET_TYPES]
        assert not optional_widgets, f"{node_id}: optional widgets {optional_widgets} would sit around the upload button"
