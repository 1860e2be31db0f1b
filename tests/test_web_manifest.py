"""Manifests as users write them: web links served by a real HTTP server (one ranged GET per
image, transient answers tried again, a query string no part of the file name), and paths
relative to the manifest's own folder."""
import gzip
import json
import sys

import pyarrow.parquet as pq
import pytest
from conftest import REPO, write_image
from web_server import ImageServer

from pipeline.scan import web, web_addresses
from pipeline.scan.reads import fetch_all
from pipeline.scan.web_addresses import PRIVATE_HOSTS_ENV

sys.path.insert(0, str(REPO))

from benchmarks.web_reads import web_figures  # noqa: E402


@pytest.fixture
def image_server(tmp_path, monkeypatch):
    """A web server on 127.0.0.1, which this process may then read (Ray's workers may: the
    ray_local fixture allows it)."""
    monkeypatch.setenv(PRIVATE_HOSTS_ENV, "allow")
    with ImageServer(str(tmp_path / "served")) as server:
        yield server


def test_web_links_are_read_in_one_ranged_get_with_transient_answers_tried_again(image_server, tmp_path):
    files = {name: write_image(tmp_path / "served" / name, size=(96, 64), seed=i)
             for i, name in enumerate(["a.png", "b.jpg"])}
    base = image_server.url
    uris = [f"{base}/files/a.png?w=64", f"{base}/flaky/b.jpg", f"{base}/files/gone.jpg", f"{base}/limited/a.png",
            f"{base}/files/b.jpg"]
    got = list(fetch_all(uris, threads=2, max_bytes=len(files["a.png"]) + 10))
    assert got[0] == (files["a.png"], None)
    assert got[1] == (files["b.jpg"], None)  # after one 503
    assert got[2][0] is None and got[2][1] == f"read failed: FileNotFoundError: {base}/files/gone.jpg"
    assert got[3][0] is None and got[3][1].startswith("read failed: ClientResponseError: 429")
    too_big = len(files["b.jpg"]) > len(files["a.png"]) + 10
    assert got[4] == ((None, f"file too large: over {len(files['a.png']) + 10:,} bytes") if too_big
                      else (files["b.jpg"], None))
    log = image_server.log
    assert not [entry for entry in log if entry[0] != "GET"]  # never a HEAD first
    assert all(entry[2] == f"bytes=0-{len(files['a.png']) + 10}" for entry in log)  # at most max + 1 bytes each
    requests = {uri: sum(entry[1] == uri[len(base):] for entry in log) for uri in uris}
    assert requests == {uris[0]: 1, uris[1]: 2, uris[2]: 1, uris[3]: 4, uris[4]: 1}
    assert {h["User-Agent"] for h in image_server.headers_seen} == {web.user_agent()}
    assert web.user_agent().startswith("mirror-at-scale/")


def test_links_to_private_addresses_are_refused_before_any_connection(image_server, tmp_path, monkeypatch):
    """Unless allowed: a literal address, a name resolving to one, a redirect to one."""
    write_image(tmp_path / "served" / "a.jpg", seed=1)
    port = image_server.server_address[1]
    monkeypatch.delenv(PRIVATE_HOSTS_ENV)
    links = [f"http://127.0.0.1:{port}/files/a.jpg", f"http://localhost:{port}/files/a.jpg",
             f"http://[::ffff:127.0.0.1]:{port}/files/a.jpg", "http://169.254.169.254/latest/meta-data/"]
    got = [error for _, error in fetch_all(links, 2)]
    assert got[0] == (f"read failed: PrivateAddressRefused: {links[0]}: host 127.0.0.1: not a public address "
                      f"(set {PRIVATE_HOSTS_ENV}=allow to read links inside your network)")
    assert got[1].startswith("read failed: PrivateAddressRefused: localhost resolves to 127.0.0.1")
    assert got[2].startswith(f"read failed: PrivateAddressRefused: {links[2]}: host ::ffff:127.0.0.1: not a public")
    assert got[3].startswith(f"read failed: PrivateAddressRefused: {links[3]}: host 169.254.169.254")
    assert image_server.log == []  # nothing reached the server, each refused once (no retries)
    # redirects are followed hop by hop, each hop checked: here 127.0.0.1 counts as public
    # and 127.0.0.2 does not, so the server answers the first hop and the second is refused
    monkeypatch.setattr(web_addresses, "is_public", lambda ip: ip == "127.0.0.1")
    image_server.redirects = {"/to/a.jpg": "/files/a.jpg", "/away/a.jpg": f"http://127.0.0.2:{port}/files/a.jpg"}
    got = list(fetch_all([f"http://127.0.0.1:{port}/to/a.jpg", f"http://127.0.0.1:{port}/away/a.jpg"], 1))
    assert got[0] == ((tmp_path / "served" / "a.jpg").read_bytes(), None)
    assert got[1][1].startswith(f"read failed: PrivateAddressRefused: http://127.0.0.2:{port}/files/a.jpg: host ")
    assert [entry[1] for entry in image_server.log] == ["/to/a.jpg", "/files/a.jpg", "/away/a.jpg"]


def test_ai_opt_outs_are_honoured_when_asked_and_only_those_meant_for_us():
    assert web.opt_out_directive(["noai"]) == "noai"
    assert web.opt_out_directive(["noindex, NoImageAI"]) == "noimageai"
    assert web.opt_out_directive(["otherbot: noai", "noindex"]) is None  # another agent's
    assert web.opt_out_directive(["otherbot: noai, nofollow, mirror-at-scale: noai"]) == "noai"
    assert web.opt_out_directive(["*: noimageai"]) == "noimageai"
    assert web.opt_out_directive(["unavailable_after: 25 Jun 2010 15:00:00 PST", "nofollow"]) is None


def test_an_opted_out_image_is_not_read_when_opt_outs_are_honoured(image_server, tmp_path):
    data = write_image(tmp_path / "served" / "a.jpg", seed=3)
    links = [f"{image_server.url}/{kind}/a.jpg" for kind in ("optout", "agents", "files")]
    assert list(fetch_all(links, 2)) == [(data, None)] * 3  # a scan reads every image
    got = list(fetch_all(links, 2, honour_opt_out=True))
    assert got == [(None, f"opted out: X-Robots-Tag noai: {links[0]}"),
                   (None, f"opted out: X-Robots-Tag noimageai: {links[1]}"), (data, None)]


def test_a_server_ignoring_the_range_is_read_no_further_than_the_limit(image_server, tmp_path):
    (tmp_path / "served").mkdir()
    (tmp_path / "served" / "big.bin").write_bytes(bytes(range(256)) * 64 * 1024)  # 16 MiB
    url = f"{image_server.url}/whole/big.bin"
    assert web.read_web(url, 1000) == (bytes(range(256)) * 4)[:1001]
    assert list(fetch_all([url], 1, max_bytes=1000)) == [(None, "file too large: over 1,000 bytes")]
    assert [entry[3] for entry in image_server.log] == [16 * 2**20] * 2  # sent whole, read in part


def test_headers_from_fsspecs_configuration_are_sent_with_web_reads(image_server, tmp_path, monkeypatch):
    import fsspec

    data = write_image(tmp_path / "served" / "a.jpg", seed=1)
    monkeypatch.setitem(fsspec.config.conf, "https", {"headers": {"Authorization": "Bearer t0ken"}})
    monkeypatch.setitem(fsspec.config.conf, "http", {"headers": {"User-Agent": "their-crawler/1"}})
    assert list(fetch_all([f"{image_server.url}/files/a.jpg"], 1)) == [(data, None)]
    (headers,) = image_server.headers_seen
    assert headers["Authorization"] == "Bearer t0ken" and headers["User-Agent"] == "their-crawler/1"
    # a redirect within the site keeps the token; one to another site (here another port)
    # does not send it there
    port = image_server.server_address[1]
    with ImageServer(str(tmp_path / "served")) as other:
        image_server.redirects = {"/to/a.jpg": "/files/a.jpg", "/away/a.jpg": f"{other.url}/files/a.jpg"}
        for path in ("/to/a.jpg", "/away/a.jpg"):
            assert list(fetch_all([f"http://127.0.0.1:{port}{path}"], 1)) == [(data, None)]
    assert [h.get("Authorization") for h in image_server.headers_seen[1:]] == ["Bearer t0ken"] * 3
    assert [h.get("Authorization") for h in other.headers_seen] == [None]


@pytest.mark.slow
def test_a_manifest_of_web_links_and_relative_paths_scans_as_the_files_themselves(ray_local, parity_bundle,
                                                                                    image_server, tmp_path):
    from mirror_core.detector import Detector
    from pipeline.scan.config import ScanConfig
    from pipeline.scan.run import run_scan, summary_line

    names = ["a.png", "b.jpg", "c.png", "d.jpg"]
    for i, name in enumerate(names):
        write_image(tmp_path / "served" / name, size=(300, 260), seed=i)
        write_image(tmp_path / "lists" / "imgs" / name, size=(300, 260), seed=10 + i)
    base = image_server.url
    # a Hugging Face image folder's metadata (file_name, compressed): web links, then paths
    # below the manifest's folder
    manifest = tmp_path / "lists" / "metadata.jsonl.gz"
    lines = [f"{base}/files/{n}?w=300" for n in names] + [f"{base}/files/gone.png"]
    lines += ["imgs/a.png", "./imgs/b.jpg", "imgs/c.png", str(tmp_path / "lists" / "imgs" / "d.jpg")]
    records = [{"file_name": u, "label": ["real", "fake"][i % 2]} for i, u in enumerate(lines)] + [{"label": "real"}]
    manifest.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))
    summary = run_scan(str(parity_bundle), str(manifest), str(tmp_path / "out"), ScanConfig(unit_size=3))
    assert summary["rows_in"] == 10 and summary["scored"] == 8 and summary["errors"] == 2
    assert summary["input_format"] == "manifest" and summary["metrics"]["ALL"]["n"] == 8
    assert summary["errors_by_kind"] == {"no uri": 1, "read failed: FileNotFoundError": 1}
    assert summary_line(summary).startswith("10/10 rows: 8 scored, 2 errors (no uri 1, read failed: "
                                            "FileNotFoundError 1); ")

    rows = {r["uri"]: r for r in pq.read_table(tmp_path / "out" / "scores").to_pylist()}
    local = [str(tmp_path / "lists" / "imgs" / n) for n in names]
    assert set(rows) == set(lines[:5]) | set(local) | {None}  # relative paths resolved, links as given
    assert rows[None]["error"] == "no uri: the record names no file (an empty manifest cell)"
    assert [rows[u]["label"] for u in lines[:5]] == [0, 1, 0, 1, 0]
    assert rows[f"{base}/files/gone.png"]["error"] == f"read failed: FileNotFoundError: {base}/files/gone.png"
    detector = Detector.from_pretrained(parity_bundle)
    for uris, paths in ((lines[:4], [str(tmp_path / "served" / n) for n in names]), (local, local)):
        expected = detector.score(paths)
        for uri, want in zip(uris, expected):
            assert rows[uri]["aligned"] == want["aligned"] == uri.split("?")[0].endswith(".png")
            assert rows[uri]["prob_fake"] == pytest.approx(want["prob_fake"], abs=1e-5)


def test_the_web_reads_harness_reads_every_link_in_one_request_against_two_by_open():
    figures = web_figures(images=12, kb=4, delay_s=0.0, threads=4)  # checks the bytes it reads
    assert figures["open_requests_per_image"] == 2.0 and figures["fetch_all_requests_per_image"] == 1.0


@pytest.mark.slow
def test_a_manifest_of_web_links_is_ingested_once_into_shards_that_scan(ray_local, parity_bundle, image_server,
                                                                         tmp_path):
    from pipeline.commands.cli import main

    served = {f"{i}.jpg": write_image(tmp_path / "served" / f"{i}.jpg", size=(200, 150), seed=i) for i in range(5)}
    base = image_server.url
    links = [f"{base}/files/{name}" for name in served] + [f"{base}/files/gone.jpg", f"{base}/optout/0.jpg"]
    # img2dataset's columns: url, caption, and a sha256 of its own (kept as input_sha256)
    (tmp_path / "links.tsv").write_text("url\tcaption\tsha256\n" + "".join(
        f"{u}\tcaption {i}\tgiven{i}\n" for i, u in enumerate(links)))
    ingest = ["ingest", "--input", str(tmp_path / "links.tsv"), "--output", str(tmp_path / "shards"),
              "--rows-per-shard", "4", "--rows-per-row-group", "2"]
    assert main(ingest) == 0
    shards = pq.read_table(tmp_path / "shards").sort_by("uri")
    assert shards["uri"].to_pylist() == sorted(links) and shards.num_rows == 7
    rows = {r["uri"]: r for r in shards.to_pylist()}
    for i, (name, data) in enumerate(served.items()):
        row = rows[f"{base}/files/{name}"]
        assert row["bytes"] == data and row["read_error"] is None and row["original_format"] == "JPEG"
        assert row["caption"] == f"caption {i}" and row["input_sha256"] == f"given{i}" and row["label"] is None
    assert rows[links[-2]]["bytes"] is None and rows[links[-2]]["read_error"].startswith("read failed: FileNotFound")
    opted_out = rows[links[-1]]  # ingest honours a site's AI opt-out (--ignore-opt-out not given)
    assert opted_out["bytes"] is None and opted_out["read_error"] == f"opted out: X-Robots-Tag noai: {links[-1]}"
    requests = len(image_server.log)
    assert main(ingest) == 0  # a rerun finds every shard there: nothing downloaded again
    assert len(image_server.log) == requests

    assert main(["scan", "--model", str(parity_bundle), "--input", str(tmp_path / "shards"), "--output",
                 str(tmp_path / "out")]) == 0
    scored = pq.read_table(tmp_path / "out" / "scores").sort_by("uri")
    assert scored["uri"].to_pylist() == sorted(links) and scored["caption"].to_pylist()[0] == "caption 0"
    assert [e is None for e in scored["error"].to_pylist()] == [u not in links[-2:] for u in sorted(links)]


def test_training_on_web_links_is_told_to_ingest_them_first(tmp_path):
    import logging

    from pipeline.train.data import plan_training_data

    links = [f"https://cdn.example/{i}.jpg" for i in range(12)] + [f"imgs/{i}.png" for i in range(8)]
    (tmp_path / "list.csv").write_text("uri,label\n" + "".join(f"{u},{i % 2}\n" for i, u in enumerate(links)))
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("mirror").addHandler(handler)
    try:
        data = plan_training_data(str(tmp_path / "list.csv"), 2, 0.3, str(tmp_path / "run"))
    finally:
        logging.getLogger("mirror").removeHandler(handler)
    assert data.n_train + data.n_val == 20  # planning reads no image
    assert [m for m in seen if "web links" in m] == [
        f"12 of {tmp_path / 'list.csv'}'s images are web links, downloaded again at every epoch: `mirror ingest` "
        "them into Parquet shards once and train on those"]


@pytest.mark.slow
def test_a_single_image_is_scanned_as_a_folder_of_one_on_disk_or_on_the_web(ray_local, parity_bundle, image_server,
                                                                            tmp_path):
    from mirror_core.detector import Detector
    from pipeline.scan.config import ScanConfig
    from pipeline.scan.run import run_scan
    from pipeline.scan.sources import SourceOptions, plan_source

    photo = tmp_path / "corpus" / "1_fake" / "photo.png"
    write_image(photo, size=(300, 260), seed=3)
    write_image(tmp_path / "served" / "web.png", size=(280, 240), seed=4)
    link = f"{image_server.url}/files/web.png?w=280"
    detector = Detector.from_pretrained(parity_bundle)
    for given, read in ((str(photo), str(photo)), (link, str(tmp_path / "served" / "web.png"))):
        out = tmp_path / f"out-{len(given)}"
        summary = run_scan(str(parity_bundle), given, str(out), ScanConfig())
        (row,) = pq.read_table(out / "scores").to_pylist()
        assert summary["input_format"] == "folder" and summary["rows_in"] == summary["scored"] == 1
        # the image alone: no label from the folders above it, the uri as given
        assert row["uri"] == given and row["label"] is None and row["error"] is None
        assert row["prob_fake"] == pytest.approx(detector.score([read])[0]["prob_fake"], abs=1e-5)
        assert row["aligned"]  # named .png (the query is not part of the name)
        again = run_scan(str(parity_bundle), given, str(out), ScanConfig(update=True))
        assert again["this_run"]["rows"] == 0 and again["rows_out"] == 1

    write_image(photo, size=(300, 260), seed=5)  # written again: an update scores it again
    changed = run_scan(str(parity_bundle), str(photo), str(tmp_path / f"out-{len(str(photo))}"),
                       ScanConfig(update=True))
    assert changed["this_run"]["rows"] == 1
    (tmp_path / "notes.docx").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"notes\.docx is a file that is neither an image .* nor a manifest"):
        plan_source(str(tmp_path / "notes.docx"), SourceOptions())
    with pytest.raises(FileNotFoundError, match=r"input .*gone\.png does not exist"):
        plan_source(str(tmp_path / "gone.png"), SourceOptions())
