"""Host: the pack registers through ComfyUI's own custom-node loader, with tooltips and descriptions everywhere."""

from __future__ import annotations

import pytest

import node_specs

pytestmark = pytest.mark.host

EXPECTED = {
    "AnyDressingLoadGarmentsNet": "Load GarmentsNet",
    "AnyDressingEncodeGarments": "Encode Garments",
    "AnyDressingApplyDressingAttention": "Apply Dressing-Attention",
    "AnyDressingGarmentMasks": "Garment Masks",
}


def test_nodes_registered_by_comfyui_loader(host):
    nodes = host.nodes
    for node_id, name in EXPECTED.items():
        assert node_id in nodes.NODE_CLASS_MAPPINGS, node_id
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id] == name
        assert nodes.NODE_CLASS_MAPPINGS[node_id].CATEGORY == "AnyDressing"
    assert "ComfyUI-AnyDressing" in nodes.LOADED_MODULE_DIRS


def test_pack_loads_without_errors_or_warnings(host):
    ours = [m for m in host.boot_warnings if "AnyDressing" in m or "anydressing" in m.lower()]
    assert ours == []


def test_every_input_and_output_has_a_tooltip_and_every_node_a_description(host):
    for node_id in EXPECTED:
        cls = host.nodes.NODE_CLASS_MAPPINGS[node_id]
        assert len(cls.DESCRIPTION) > 40
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, (typ, *opts) in spec.get(section, {}).items():
                assert opts and opts[0].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
        assert all(cls.OUTPUT_TOOLTIPS)


def test_custom_types_and_model_folder(host):
    m = host.nodes.NODE_CLASS_MAPPINGS
    assert tuple(m["AnyDressingLoadGarmentsNet"].RETURN_TYPES) == ("GARMENTS_NET",)
    assert m["AnyDressingEncodeGarments"].RETURN_TYPES[0] == "GARMENT_FEATURES"
    assert tuple(m["AnyDressingGarmentMasks"].RETURN_TYPES) == ("GARMENT_MASKS", "MASK")
    assert m["AnyDressingApplyDressingAttention"].INPUT_TYPES()["optional"]["garment_masks"][0] == "GARMENT_MASKS"
    paths, exts = host.folder_paths.folder_names_and_paths["anydressing"]
    assert str(host.models_dir / "anydressing") in paths
    # a weight file dropped into models/anydressing/ is offered by Load GarmentsNet; a training log beside it is not
    (host.anydressing_dir() / "listed.safetensors").write_bytes(b"")
    (host.anydressing_dir() / "listed.safetensors.losses.csv").write_text("step\n")
    host.folder_paths.cache_helper.clear() if hasattr(host.folder_paths, "cache_helper") else None
    choices = node_specs.choices(m["AnyDressingLoadGarmentsNet"].INPUT_TYPES()["required"]["garments_net_name"])
    assert choices[0] == "training-free" and "listed.safetensors" in choices
    assert not any(c.endswith(".csv") for c in choices)
    (host.anydressing_dir() / "listed.safetensors").unlink()
    (host.anydressing_dir() / "listed.safetensors.losses.csv").unlink()


def test_model_folder_is_created_at_start_up_when_absent(host, tmp_path):
    fp = host.folder_paths
    saved_dir, saved_entry = fp.models_dir, fp.folder_names_and_paths.pop("anydressing")
    try:
        fp.models_dir = str(tmp_path)
        host.pack_module("nodes.model_folder").register_model_folder()
        assert (tmp_path / "anydressing").is_dir()
        assert fp.folder_names_and_paths["anydressing"][0] == [str(tmp_path / "anydressing")]
        # an entry that extra_model_paths.yaml made first keeps its paths and its extension set
        fp.folder_names_and_paths["anydressing"] = (["/models/shared/anydressing"], {".safetensors"})
        host.pack_module("nodes.model_folder").register_model_folder()
        assert fp.folder_names_and_paths["anydressing"] == (
            ["/models/shared/anydressing", str(tmp_path / "anydressing")], {".safetensors"})
    finally:
        fp.models_dir = saved_dir
        fp.folder_names_and_paths["anydressing"] = saved_entry


def test_every_help_page_has_the_tables_of_its_nodes_schema_and_core_layout(host):
    """web/docs/<NodeId>.md: purpose, the inputs and outputs tables as tools/help_pages.py makes them from the node's
    own /object_info entry (so they cannot drift from the schema), typical settings, errors."""
    import sys
    from pathlib import Path

    sys.path.append(str(Path(host_mod_repo()) / "tools"))
    import help_pages

    info = host.request("/object_info")
    docs = Path(host_mod_repo()) / "web" / "docs"
    ours = sorted(k for k in host.nodes.NODE_CLASS_MAPPINGS if k.startswith("AnyDressing"))
    assert sorted(p.stem for p in docs.glob("*.md")) == ours
    for node_id in ours:
        page = (docs / f"{node_id}.md").read_text()
        assert page.startswith(f"# {host.nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id]}\n\n")
        assert help_pages.with_tables(page, node_id, info[node_id]) == page, (
            f"{node_id}: the page's tables differ from the schema: run tools/help_pages.py")
        sections = [line for line in page.splitlines() if line.startswith("## ")]
        assert sections == ["## Inputs", "## Outputs", "## Typical settings", "## Errors"], (node_id, sections)
    assert host.nodes.EXTENSION_WEB_DIRS.get("ComfyUI-AnyDressing", "").endswith("web")


def test_pyproject_is_valid_for_the_comfy_registry(host):
    import re
    import tomllib
    from pathlib import Path

    from comfy_config import config_parser

    repo = Path(host_mod_repo())
    cfg = config_parser.extract_node_configuration(str(repo))
    assert cfg.tool_comfy.publisher_id == "anydressing" and cfg.tool_comfy.display_name == "ComfyUI-AnyDressing"
    assert cfg.tool_comfy.icon.startswith("https://") and cfg.tool_comfy.icon.endswith((".png", ".svg", ".jpg"))
    assert cfg.project.supported_comfyui_version.startswith(">=")
    assert cfg.project.license.file == "LICENSE" and (repo / "LICENSE").is_file()
    raw = tomllib.loads((repo / "pyproject.toml").read_text())
    assert re.fullmatch(r"\d+\.\d+\.\d+", raw["project"]["version"])
    assert "comfyui" not in raw["project"]["name"].lower()
    assert raw["project"]["urls"]["Repository"].startswith("https://github.com/")
    assert sorted(raw["project"]["dependencies"]) == sorted((repo / "requirements.txt").read_text().split())
    assert not any(d.startswith(("torch", "torchvision", "torchaudio")) for d in raw["project"]["dependencies"])
    assert (repo / "docs" / "icon.png").is_file()  # the icon the URL points to, once pushed


def host_mod_repo():
    import host as host_mod

    return host_mod.REPO


def test_node_errors_show_a_plain_stable_type_name_and_survive_pickling(host):
    import pickle

    glue = host.pack_module("nodes.glue")
    err = glue.NodeError("Encode Garments", "image_1: something to fix")
    assert host.execution.full_type_name(type(err)) == "anydressing.NodeError"  # the type ComfyUI prints
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err) and str(back) == "[AnyDressing] Encode Garments: image_1: something to fix"
