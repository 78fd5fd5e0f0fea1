"""neu-review's parts without a browser: the queue, the audit log and what it decides, tile pixels,
leases, and the HTTP API's refusals (FastAPI's TestClient)."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import zipfile

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from neu_model.core.stage import StageError
from neu_model.inference.decode import decode
from neu_model.review.auditlog import AuditLog, Decisions, read_records
from neu_model.review.cli import cli
from neu_model.review.queue import AUDIT, REVIEW, load_queue
from neu_model.review.server import TOKEN_HEADER, check_bind, create_app
from neu_model.review.session import ReviewSession
from neu_model.review.tiles import read_tile

from review_support import copy_images, flagged_folder, row, strip, write_predictions

TOKEN = "t" * 32


def test_queue_unknown_first_then_least_confident_then_the_audit_share(tmp_path):
    images = copy_images(tmp_path / "img", ["Cr_1", "In_1", "Pa_1", "PS_1", "RS_1", "Sc_1", "Cr_2", "In_2",
                                            "Pa_2", "PS_2", "RS_2", "Sc_2"])
    names = [f"img/{p.name}" for p in images]
    rows = [row(names[0], "Cr", 0.40), row(names[1], "In", 0.20), row(names[2], "Pa", 0.55, unknown=True),
            row(names[3], "PS", 0.30), row("img/gone.bmp", "Cr", 0.1, error="cannot be read"),
            *(row(n, "RS", 0.95) for n in names[4:])]
    first = write_predictions(tmp_path / "a.csv", rows)
    # The same tile again in a second CSV, and one more flagged tile.
    second = write_predictions(tmp_path / "b.csv", [row(names[0], "Cr", 0.40), row(names[4], "RS", 0.10)])
    queue = load_queue([first, second], random_share=0.25, seed=3)
    review = [t for t in queue.tiles if t.queue == REVIEW]
    assert [t.origin.ref for t in review] == [names[2], names[4], names[1], names[3], names[0]]
    assert [t.confidence for t in review] == [0.55, 0.10, 0.20, 0.30, 0.40]
    audit = [t for t in queue.tiles if t.queue == AUDIT]
    assert len(audit) == 2 and all(t.confidence == 0.95 for t in audit)  # ceil(25 % of the 7 confident)
    assert queue.tiles[-2:] == audit and [t.id for t in queue.tiles] == list(range(len(queue.tiles)))
    assert len({t.key for t in queue.tiles}) == len(queue.tiles) == 7  # the duplicate is one item
    assert [t.key for t in audit] == [t.key for t in load_queue([first, second], 0.25, 3).tiles[-2:]]  # seeded
    assert all(t.key.endswith(":0:0") and len(t.key.split(":")[0]) == 64 for t in queue.tiles)


def test_a_missing_or_foreign_csv_is_one_line_naming_it(tmp_path):
    with pytest.raises(StageError, match="nope.csv: cannot be read"):
        load_queue([tmp_path / "nope.csv"])
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(StageError, match="other.csv: no column file"):
        load_queue([tmp_path / "other.csv"])


def test_the_audit_log_appends_synced_lines_and_cuts_a_partial_last_one(tmp_path, caplog):
    log = AuditLog(tmp_path)
    first = log.append({"kind": "label", "tile": "k:0:0", "label": "Cr", "reviewer": "alice"})
    log.append({"kind": "skip", "tile": "k:0:200", "reviewer": "alice"})
    log.close()
    path = tmp_path / "audit.jsonl"
    complete = path.read_bytes()
    assert complete.count(b"\n") == 2 and json.loads(complete.splitlines()[0])["id"] == first["id"] == 1
    with open(path, "ab") as fh:  # what a SIGKILL in the middle of a write leaves
        fh.write(b'{"id":3,"kind":"label","tile":"k:')
    assert len(read_records(path)) == 2 and path.read_bytes() != complete  # a reader leaves it
    with caplog.at_level(logging.WARNING):
        log = AuditLog(tmp_path)
    assert "removed a partial last line" in caplog.text
    assert path.read_bytes() == complete and [r["id"] for r in log.records] == [1, 2]
    assert log.append({"kind": "label", "tile": "k:0:0", "label": "In", "reviewer": "bob"})["id"] == 3
    assert [json.loads(line)["id"] for line in path.read_bytes().splitlines()] == [1, 2, 3]
    path.write_bytes(path.read_bytes() + b"not json\n")
    with pytest.raises(StageError, match=r"audit.jsonl:4: .*restore it"):
        AuditLog(tmp_path)


def label(id, tile, label, reviewer, kind="label", undoes=None):
    return {"id": id, "kind": kind, "tile": tile, "label": label, "reviewer": reviewer, "undoes": undoes}


def test_final_labels_follow_undo_and_keep_disagreements_as_conflicts():
    records = [label(1, "A", "Cr", "alice"), label(2, "A", "In", "alice"),  # alice changes her mind
               label(3, "A", "In", "alice", "undo", undoes=2),  # ... and takes it back: Cr again
               label(4, "B", "Sc", "alice"), label(5, "B", "RS", "bob"),  # they disagree
               label(6, "C", None, "bob", "skip"), label(7, "C", None, "bob", "undo", undoes=6),
               label(8, "D", "unknown", "bob")]
    decisions = Decisions.replay(records)
    assert decisions.final("A").label == "Cr" and decisions.final("A").record["id"] == 1
    assert decisions.final("B").label is None and decisions.final("B").conflict
    assert decisions.final("B").votes == {"alice": "Sc", "bob": "RS"}
    assert decisions.final("D").label == "unknown"
    assert "C" not in decisions.skipped["bob"] and decisions.last_decision("bob")["id"] == 8
    decisions.apply(label(9, "B", "RS", "carol"))  # a third reviewer settles it
    assert decisions.final("B").label == "RS" and decisions.final("B").record["id"] == 9
    assert set(decisions.labelled()) == {"A", "B", "D"}


def test_read_tile_gives_the_pixels_the_model_saw_from_files_and_archives(tmp_path):
    import torch

    from neu_model.inference.tile_boxes import tiles_uint8

    image = strip(tmp_path / "strip.png")
    pixels = np.asarray(Image.open(image))
    tile = read_tile(str(image), 200, 200)
    assert tile.dtype == np.uint8 and tile.shape == (200, 200)
    assert np.array_equal(tile, pixels[200:400, 200:400])
    # A 16-bit image: the float tile the model saw, quantised as tile_boxes.tiles_uint8 does.
    deep = (np.arange(400 * 600, dtype=np.uint32).reshape(400, 600) * 7 % 65536).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    model_saw = decode((tmp_path / "deep.png").read_bytes()).crop(400, 0, 200)
    assert np.array_equal(read_tile(str(tmp_path / "deep.png"), 400, 0),
                          tiles_uint8(torch.from_numpy(model_saw)).numpy())
    with zipfile.ZipFile(tmp_path / "day.zip", "w") as zf:
        zf.write(image, "line1/strip.png")
    with tarfile.open(tmp_path / "day.tar.gz", "w:gz") as tf:
        tf.add(image, "./line1/strip.png")
    for archive in ("day.zip", "day.tar.gz"):
        assert np.array_equal(read_tile(f"{tmp_path / archive}:line1/strip.png", 400, 0), pixels[0:200, 400:600])
    with pytest.raises(Exception, match="outside the 600x400 image"):
        read_tile(str(image), 400, 400)


@pytest.fixture
def review(tmp_path):
    """A session over ``flagged_folder`` with a fake clock, and a TestClient of its app."""
    pred = flagged_folder(tmp_path / "work")
    clock = [1000.0]
    session = ReviewSession(load_queue([pred], 0.05, 0), AuditLog(tmp_path / "state"), clock=lambda: clock[0])
    client = TestClient(create_app(session, TOKEN, allowed_hosts=["testserver"]))
    client.headers[TOKEN_HEADER] = TOKEN
    return session, client, clock, pred


def test_requests_holding_a_path_are_refused(review):
    _, client, _, _ = review
    for url in ["/static/%2e%2e/%2e%2e/etc/passwd", "/static/..%2F..%2Fetc%2Fpasswd", "/api/tiles/..%2F0/tile.png",
                "/api/tiles/%2Fetc%2Fpasswd/tile.png", "/api/state?file=/etc/passwd", "/api/state?f=..%2F..%2Fx",
                "/api/state?f=%252e%252e%252fx", "/?file=C:/Windows/win.ini"]:
        answer = client.get(url)
        assert answer.status_code == 400 and "refused" in answer.json()["error"], url
    assert client.get("/static/../../etc/passwd").status_code in (400, 404)  # the client may fold the dots
    assert client.get("/static/review.js").status_code == 200
    assert client.get("/static/index.html").status_code == 404  # a fixed list of names, nothing else


def test_state_changing_requests_need_the_token_and_a_reviewer(review):
    session, client, _, _ = review
    body = {"reviewer": "alice", "id": 0, "kind": "label", "label": "Cr"}
    for headers in ({TOKEN_HEADER: ""}, {TOKEN_HEADER: "wrong" * 8}):
        for path, payload in (("/api/decide", body), ("/api/claim", {"reviewer": "alice"}),
                              ("/api/undo", {"reviewer": "alice"})):
            answer = client.post(path, json=payload, headers=headers)
            assert answer.status_code == 403 and TOKEN_HEADER in answer.json()["error"]
    assert client.get("/api/tiles/0/tile.png", headers={TOKEN_HEADER: ""}).status_code == 403
    for name in ("", "   "):
        answer = client.post("/api/decide", json=body | {"reviewer": name})
        assert answer.status_code == 422 and "reviewer name is required" in answer.json()["error"]
    assert client.post("/api/decide", json=body | {"label": "XX"}).status_code == 422
    assert not session.log.records  # nothing refused was recorded
    assert client.post("/api/decide", json=body | {"seconds": 2.5}).status_code == 200
    assert session.log.records[-1]["label"] == "Cr" and session.log.records[-1]["seconds"] == 2.5


def test_the_page_embeds_a_token_made_per_start_and_loads_nothing_from_elsewhere(review):
    session, _, _, _ = review
    page = TestClient(create_app(session, TOKEN, allowed_hosts=["testserver"])).get("/")
    assert f'content="{TOKEN}"' in page.text and "http" not in page.text.replace("http-equiv", "")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    asked = TestClient(create_app(session, TOKEN, embed_token=False)).get("/")
    assert TOKEN not in asked.text
    rebinding = TestClient(create_app(session, TOKEN, allowed_hosts=["127.0.0.1", "localhost"]))
    assert rebinding.get("/", headers={"host": "evil.example"}).status_code == 400


def test_a_bind_beyond_this_machine_needs_a_token(capsys, tmp_path):
    with pytest.raises(StageError, match="--host 0.0.0.0: other machines could post labels; pass --token"):
        check_bind("0.0.0.0", None)
    with pytest.raises(StageError, match="at least 16"):
        check_bind("0.0.0.0", "short")
    check_bind("0.0.0.0", TOKEN)
    check_bind("127.0.0.1", None)
    assert cli(["serve", str(tmp_path / "p.csv"), "--host", "0.0.0.0", "--state", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --host 0.0.0.0") and "\n" not in err


def test_two_reviewers_never_hold_one_tile_until_a_lease_expires(review):
    session, client, clock, _ = review
    alice = client.post("/api/claim", json={"reviewer": "alice"}).json()
    bob = client.post("/api/claim", json={"reviewer": "bob"}).json()
    held = [t["id"] for t in alice["add"]]
    assert [t["id"] for t in alice["add"]] == [0, 1, 2] and [t["id"] for t in bob["add"]] == [3, 4, 5]
    assert alice["add"][0]["unknown"] and alice["add"][0]["model_version"] == "models:/neu-defect-classifier/3"
    assert client.post("/api/claim", json={"reviewer": "alice", "holding": held}).json()["keep"] == held
    clock[0] += 121  # alice walked away
    again = client.post("/api/claim", json={"reviewer": "carol"}).json()
    assert [t["id"] for t in again["add"]] == held  # free again; bob's are his till he is idle too
    # alice comes back and labels tile 0 In, carol labels it Cr: a conflict, kept, never overwritten
    for who, code in (("carol", "Cr"), ("alice", "In")):
        assert client.post("/api/decide", json={"reviewer": who, "id": 0, "kind": "label", "label": code}).status_code \
            == 200
    counts = client.get("/api/state").json()["counts"]
    assert counts["conflicts"] == 1 and counts["reviewed"] == 0
    dave = client.post("/api/claim", json={"reviewer": "dave"}).json()["add"]
    assert dave[0]["id"] == 0 and dave[0]["conflict"] == {"alice": "In", "carol": "Cr"}  # to a third person first
    assert all(t["id"] != 0 for t in client.post("/api/claim", json={"reviewer": "alice"}).json()["add"])


def test_undo_takes_back_the_reviewers_last_decision_and_a_restart_keeps_everything(review, tmp_path):
    session, client, _, pred = review
    post = lambda path, **body: client.post(path, json={"reviewer": "alice", **body}).json()  # noqa: E731
    post("/api/decide", id=0, kind="label", label="Pa")
    post("/api/decide", id=1, kind="skip")
    post("/api/decide", id=2, kind="label", label="unknown")
    undone = post("/api/undo")
    assert undone["undone"]["label"] == "unknown" and undone["tile"]["id"] == 2
    assert [r["kind"] for r in session.log.records] == ["label", "skip", "label", "undo"]
    assert session.log.records[-1]["undoes"] == session.log.records[2]["id"]
    assert client.get("/api/state?reviewer=alice").json()["counts"]["skipped"] == 1
    session.log.close()
    restarted = ReviewSession(load_queue([pred], 0.05, 0), AuditLog(tmp_path / "state"))
    _, offered = restarted.claim("alice", [])
    assert [t["id"] for t in offered] == [2, 3, 4]  # 0 labelled, 1 skipped by alice, 2 undone: back
    assert [t["id"] for t in restarted.claim("bob", [])[1]] == [1, 5, 6]  # alice's skip is bob's to see


def test_a_tile_whose_file_changed_since_it_was_predicted_is_refused(review):
    session, client, _, pred = review
    first, second = session.tiles[0], session.tiles[1]
    # Same modification time, other bytes: caught by the sha256 recorded at start.
    stat = first.origin.path.stat()
    pixels = np.asarray(Image.open(first.origin.path)).copy()
    pixels[0, 0] ^= 0xFF
    Image.fromarray(pixels).save(first.origin.path, format="BMP")
    os.utime(first.origin.path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    answer = client.get(f"/api/tiles/{first.id}/tile.png")
    assert answer.status_code == 409 and "changed on disk since it was predicted" in answer.json()["error"]
    # Newer than the CSV: refused too, even for a label posted without looking.
    os.utime(second.origin.path, (pred.stat().st_mtime + 10,) * 2)
    answer = client.post("/api/decide", json={"reviewer": "alice", "id": second.id, "kind": "label", "label": "Cr"})
    assert answer.status_code == 409 and second.origin.ref in answer.json()["error"]
    assert not session.log.records and client.get("/api/state").json()["counts"]["changed"] == 2
    assert all(t["id"] not in (first.id, second.id) for t in client.post("/api/claim", json={"reviewer": "x"})
               .json()["add"])
    reloaded = load_queue([pred], 0.05, 0)  # a restart sees the newer file at once
    assert next(t for t in reloaded.tiles if t.origin.ref == second.origin.ref).changed


def test_tiles_come_as_pngs_and_boxes_in_tile_pixels(tmp_path):
    image = strip(tmp_path / "strip.png")
    boxes = [[210, 190, 260, 250, 0.9], [0, 0, 10, 10, 0.1]]
    pred = write_predictions(tmp_path / "p.csv", [row(str(image), "In", 0.3, x=200, y=200, boxes=boxes)])
    session = ReviewSession(load_queue([pred], 0.0), AuditLog(tmp_path / "s"))
    _, [info] = session.claim("alice", [])
    assert info["boxes"] == [[10, 0, 60, 50, 0.9]]  # clipped to the tile, the one outside dropped
    png = Image.open(io.BytesIO(session.image(0)))
    assert png.mode == "L" and np.array_equal(np.asarray(png), np.asarray(Image.open(image))[200:400, 200:400])
    context = Image.open(io.BytesIO(session.image(0, context=True)))
    assert context.size == (600, 400) and context.getpixel((200, 200)) == (255, 96, 0)  # outlined tile


def test_review_imports_only_core_data_and_inference():
    from import_graph import graph

    allowed = ("neu_model.core", "neu_model.data", "neu_model.inference", "neu_model.review")
    wrong = sorted(f"{module} imports {target}" for module, targets in graph().items()
                   if module.startswith("neu_model.review") for target in targets
                   if target.startswith("neu_model.") and not target.startswith(allowed))
    assert not wrong, "; ".join(wrong)
