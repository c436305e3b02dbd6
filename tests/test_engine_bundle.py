"""Bundles: cleaning reported, manifest and hashes checked, arrays mapped read-only, no pickle."""
import json

import numpy as np
import pytest
from engine_data import build_small, small_catalogue_and_events

from recscore import bundle
from recscore.cli import main


def test_cleaning_counts_and_drops_what_it_cannot_trust():
    catalogue, (users, items, values, times) = small_catalogue_and_events()
    users = np.concatenate([users, [1, 1, 2, 3]])
    items = np.concatenate([items, [items[0], 99999, items[5], items[6]]])     # repeat, unknown
    values = np.concatenate([values, [4.0, 4.0, np.nan, 9.0]])                 # NaN, out of range
    times = np.concatenate([times, [times[0] + 10**6, 5, 5, 5]])
    (u, i, v, t), report = bundle.clean_events(users, items, values, times, catalogue, (0.5, 5.0), malformed=2)
    assert report["unknown_item"] == 1 and report["out_of_range"] == 2 and report["duplicate"] == 1
    assert report["malformed"] == 2 and report["rows"] == len(users) + 2
    assert report["kept"] == len(u) == len(users) - 4
    pairs = set(zip(u.tolist(), i.tolist()))
    assert len(pairs) == len(u) and 99999 not in i
    assert t[(u == 1) & (i == items[0])][0] == times[0] + 10**6      # the latest event of a repeated pair


def test_bundle_layout_manifest_and_read_only_maps(tmp_path):
    path = build_small(tmp_path / "b")
    names = sorted(p.name for p in path.iterdir())
    assert names == sorted(bundle.ARRAY_FILES + (bundle.ITEMS_JSON, bundle.MANIFEST))
    manifest = json.loads((path / bundle.MANIFEST).read_text())
    assert manifest["schema_version"] == bundle.SCHEMA_VERSION and manifest["counts"]["items"] == 200
    assert set(manifest["files"]) == set(bundle.ARRAY_FILES) | {bundle.ITEMS_JSON}
    assert manifest["models"]["puresvd"]["rank"] == 16 and manifest["cleaning"]["kept"] == manifest["counts"]["events"]
    opened = bundle.open_bundle(path)
    vectors = opened.arrays["puresvd.safetensors"]["item_vectors"]
    assert vectors.shape == (200, 16) and not vectors.flags.writeable
    with pytest.raises(ValueError):
        vectors[0, 0] = 1.0
    for name in bundle.ARRAY_FILES:      # safetensors, not pickle: a JSON header after 8 bytes of length
        raw = (path / name).read_bytes()
        json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])


def test_a_damaged_file_is_named(tmp_path):
    path = build_small(tmp_path / "b")
    target = path / "ease.safetensors"
    raw = bytearray(target.read_bytes())
    raw[-3] ^= 0xFF
    target.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="ease.safetensors"):
        bundle.open_bundle(path)


def test_a_foreign_or_missing_bundle_is_refused(tmp_path):
    with pytest.raises(ValueError, match="manifest.json"):
        bundle.open_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a recscore bundle"):
        bundle.open_bundle(tmp_path)
    path = build_small(tmp_path / "b")
    (path / "items.json").unlink()
    with pytest.raises(ValueError, match="items.json"):
        bundle.open_bundle(path)


def test_a_header_that_disagrees_with_the_manifest_is_refused(tmp_path):
    path = build_small(tmp_path / "b")
    manifest = json.loads((path / bundle.MANIFEST).read_text())
    manifest["files"]["puresvd.safetensors"]["arrays"]["item_vectors"]["shape"] = [200, 8]
    (path / bundle.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="puresvd.safetensors"):
        bundle.open_bundle(path)


def test_build_command_on_generic_csv(tmp_path, capsys):
    catalogue, (users, items, values, times) = small_catalogue_and_events()
    events = tmp_path / "events.csv"
    lines = ["user,item,value,timestamp"] + [f"{u},{i},{v},{t}" for u, i, v, t in zip(users, items, values, times)]
    events.write_text("\n".join(lines + ["7,not-an-id,1,1", f"7,{items[0]},-3,1"]) + "\n")
    items_csv = tmp_path / "items.csv"
    items_csv.write_text("item,title,genres\n" + "\n".join(
        f"{i},\"{t}\",{'|'.join(g)}" for i, t, g in zip(catalogue.ids, catalogue.titles, catalogue.genres)) + "\n")
    assert main(["build", str(events), "--items", str(items_csv), "--min-value", "0", "--no-tune",
                 "-o", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "malformed 1" in out and "out_of_range 1" in out
    opened = bundle.open_bundle(tmp_path / "b")
    assert opened.manifest["cleaning"]["malformed"] == 1 and opened.genre_names == ["Comedy", "Drama", "Horror"]
    assert main(["recommend", str(tmp_path / "b"), "3", "-k", "3"]) == 0
    assert capsys.readouterr().out.count("\n") == 4
    assert main(["recommend", str(tmp_path / "missing"), "3"]) == 2
