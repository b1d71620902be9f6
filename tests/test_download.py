"""`litft download`, offline: which files are fetched, argument handling, clear errors without a network,
and the convert step on a folder as the Hub would deliver it. The Hub is never contacted: the session runs
with HF_HUB_OFFLINE=1 (conftest) and the one online-mode test points HF_ENDPOINT at a closed local port."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from litft.download import download, finish_download, known_models, select_metadata_files, select_weight_files

TOKENIZER = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]

# Llama 3.x on the Hub: HF safetensors shards + index, and the original Meta checkpoint under original/
LLAMA3_REPO = ["README.md", "LICENSE.txt", ".gitattributes", "config.json", *TOKENIZER,
               "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
               "original/consolidated.00.pth", "original/params.json", "original/tokenizer.model"]
# Mistral 7B v0.3: HF shards + index next to a consolidated.safetensors in Mistral's own layout
MISTRAL_REPO = ["config.json", "tokenizer.model", "tokenizer.model.v3", "tokenizer.json", "tokenizer_config.json",
                "consolidated.safetensors", "params.json", "model.safetensors.index.json",
                "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                "model-00003-of-00003.safetensors"]
# an older repo with both formats
BOTH_REPO = ["config.json", "tokenizer.model", "tokenizer_config.json", "model.safetensors", "pytorch_model.bin",
             "flax_model.msgpack", "tf_model.h5", "model.gguf"]
BIN_ONLY_REPO = ["config.json", "tokenizer.json", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
                 "pytorch_model-00002-of-00002.bin", "consolidated.00.pth"]


def _index(*shards: str) -> dict:
    return {"metadata": {}, "weight_map": {f"w{i}": s for i, s in enumerate(shards)}}


def test_safetensors_shards_from_index_and_no_original_duplicates():
    assert select_metadata_files(LLAMA3_REPO) == sorted(["config.json", *TOKENIZER, "model.safetensors.index.json"])
    index = _index("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                   "model-00001-of-00002.safetensors")
    assert select_weight_files(LLAMA3_REPO, index) == ["model-00001-of-00002.safetensors",
                                                       "model-00002-of-00002.safetensors"]


def test_consolidated_safetensors_is_skipped():
    meta = select_metadata_files(MISTRAL_REPO)
    assert "consolidated.safetensors" not in meta and "model.safetensors.index.json" in meta
    assert "tokenizer.model" in meta and "tokenizer.model.v3" not in meta and "params.json" not in meta
    shards = [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert select_weight_files(MISTRAL_REPO, _index(*shards)) == shards
    # without an index (none fetched), the consolidated file is still not taken
    assert select_weight_files([f for f in MISTRAL_REPO if "index" not in f]) == shards


def test_safetensors_preferred_over_bin_and_other_formats():
    assert select_metadata_files(BOTH_REPO) == ["config.json", "tokenizer.model", "tokenizer_config.json"]
    assert select_weight_files(BOTH_REPO) == ["model.safetensors"]


def test_bin_only_repo_uses_its_index():
    assert select_metadata_files(BIN_ONLY_REPO) == ["config.json", "pytorch_model.bin.index.json", "tokenizer.json"]
    shards = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    assert select_weight_files(BIN_ONLY_REPO, _index(*shards)) == shards
    assert select_weight_files([f for f in BIN_ONLY_REPO if "index" not in f]) == shards


def test_tokenizer_only_selects_no_weights_nor_config():
    assert select_metadata_files(LLAMA3_REPO, tokenizer_only=True) == sorted(TOKENIZER)


def test_repo_without_hf_weights_is_a_clear_error():
    with pytest.raises(ValueError, match=r"no weights in Hugging Face layout.*consolidated\.00\.pth"):
        select_weight_files(["config.json", "params.json", "consolidated.00.pth", "original/model.pth"])
    with pytest.raises(ValueError, match="weight_map"):
        select_weight_files(LLAMA3_REPO, {"metadata": {}})


# ---------------------------------------------------------------------------------------------- the CLI


def _litft(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "litft", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def test_no_repo_id_lists_the_zoo():
    r = _litft("download")
    assert r.returncode == 0, r.stderr
    listed = r.stdout.split()
    for name in ("meta-llama/Llama-3.2-1B", "mistralai/Mixtral-8x7B-v0.1", "google/gemma-2-9b", "Qwen/Qwen3-0.6B"):
        assert name in listed
    assert len(known_models()) >= 40


def test_help_documents_every_option():
    r = _litft("download", "--help")
    assert r.returncode == 0, r.stderr
    for option in ("--repo_id", "--checkpoint_dir", "--access_token", "--tokenizer_only", "--convert", "--dtype",
                   "--keep_hf", "--overwrite", "HF_TOKEN"):
        assert option in r.stdout


def test_unknown_short_name_suggests_close_ones(tmp_path):
    r = _litft("download", "Llama-3.2-1b-Instrct", "--checkpoint_dir", str(tmp_path / "ck"))
    assert r.returncode == 1
    assert "litft download: error: unknown model name 'Llama-3.2-1b-Instrct'" in r.stderr
    assert "Llama-3.2-1B-Instruct" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "ck").exists()


def test_offline_mode_is_a_clear_error_and_leaves_nothing(tmp_path):
    # a short name resolves to its repo id before the hub is asked
    r = _litft("download", "Llama-3.2-1B", "--checkpoint_dir", str(tmp_path / "ck"), env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1
    assert "cannot reach the Hugging Face Hub" in r.stderr and "HF_HUB_OFFLINE" in r.stderr
    assert "meta-llama/Llama-3.2-1B" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "ck").exists()


def test_unreachable_hub_is_a_clear_error(tmp_path):
    # online mode, but the endpoint is a closed local port: fails at once, never leaves this machine
    r = _litft("download", "meta-llama/Llama-3.2-1B", "--checkpoint_dir", str(tmp_path / "ck"),
               "--access_token", "hf_dummy", env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert r.returncode == 1
    assert "litft download: error: cannot reach the Hugging Face Hub at http://127.0.0.1:9" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "ck").exists()


def test_bad_arguments_fail_before_any_download(tmp_path):
    out = tmp_path / "ck" / "meta-llama" / "Llama-3.2-1B"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    r = _litft("download", "meta-llama/Llama-3.2-1B", "--checkpoint_dir", str(tmp_path / "ck"))
    assert r.returncode == 1 and "exists and is not empty; pass --overwrite true" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"
    r = _litft("download", "meta-llama/Llama-3.2-1B", "--checkpoint_dir", str(tmp_path / "other"), "--dtype", "fp12")
    assert r.returncode == 1 and "unknown dtype 'fp12'" in r.stderr
    r = _litft("download", "meta-llama/Llama-3.2-1B", "--tokenizer_only", "maybe")
    assert r.returncode != 0 and "tokenizer_only" in r.stderr


def test_python_call_raises_the_same_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot reach the Hugging Face Hub"):
        download("Qwen/Qwen3-0.6B", checkpoint_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ after the fetch: convert, keep, move


def _fetched(tiny_llama_hf: Path, tmp_path: Path) -> Path:
    """A copy of a tiny HF model where `download` stages it, with huggingface_hub's resume metadata."""
    staging = tmp_path / "ck" / "org" / ".tiny.download"
    shutil.copytree(tiny_llama_hf, staging)
    (staging / ".cache" / "huggingface").mkdir(parents=True)
    (staging / ".cache" / "huggingface" / "model.safetensors.metadata").write_text("etag")
    return staging


def test_finish_converts_and_removes_the_hf_files(tiny_llama_hf, tiny_llama_native, tmp_path):
    staging = _fetched(tiny_llama_hf, tmp_path)
    out = finish_download(staging, tmp_path / "ck" / "org" / "tiny", repo_id="org/tiny")
    assert not staging.exists()
    assert sorted(p.name for p in (tmp_path / "ck" / "org").iterdir()) == ["tiny"]
    assert "hf_id: org/tiny" in (out / "model_config.yaml").read_text()
    assert (out / "tokenizer.json").is_file() and not (out / "hf").exists()
    ours, ref = load_file(out / "model.safetensors"), load_file(tiny_llama_native / "model.safetensors")
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)


def test_finish_keep_hf_and_dtype(tiny_llama_hf, tmp_path):
    staging = _fetched(tiny_llama_hf, tmp_path)
    out = finish_download(staging, tmp_path / "ck" / "org" / "tiny", dtype="bfloat16", keep_hf=True)
    assert load_file(out / "model.safetensors")["embed.weight"].dtype == torch.bfloat16
    assert (out / "hf" / "config.json").is_file() and (out / "hf" / "model.safetensors").is_file()
    assert not (out / "hf" / ".cache").exists()


def test_finish_without_convert_and_tokenizer_only(tiny_llama_hf, tmp_path):
    out = finish_download(_fetched(tiny_llama_hf, tmp_path), tmp_path / "ck" / "org" / "raw", convert=False)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not (out / "model_config.yaml").exists() and not (out / ".cache").exists()
    out = finish_download(_fetched(tiny_llama_hf, tmp_path), tmp_path / "ck" / "org" / "tok", tokenizer_only=True)
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "ck" / "org").iterdir()) == ["raw", "tok"]


# ------------------------------------------------------------------ a local stand-in for the Hub's error answers


class _FakeHub:
    """A local HTTP server answering like huggingface.co for three repos: ``org/gated`` (metadata public, files need
    an accepted licence: 401 without a token, 403 with one), any other repo (401 "RepoNotFound" without a token, 404
    with one, as the Hub answers for missing repos), and any request with the token ``hf_invalid`` (401 "Invalid
    credentials"). The real huggingface_hub client in a real ``litft download`` process talks to it."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.requests: list[tuple[str, str, bool]] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _answer(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", "Content-Length": str(len(body)),
                             **(headers or {})}.items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_HEAD(self) -> None:
                self.do_GET()

            def do_GET(self) -> None:
                import json as _json

                auth = self.headers.get("Authorization", "")
                hub.requests.append((self.command, self.path, bool(auth)))
                if auth == "Bearer hf_invalid":
                    return self._answer(401, b'{"error": "Invalid credentials in Authorization header"}', {
                        "X-Error-Message": "Invalid credentials in Authorization header"})
                path = self.path.split("?")[0]
                files = ("config.json", "model.safetensors", "tokenizer.json")
                if path.startswith("/api/models/org/gated/tree/"):  # the file list of a gated repo is public
                    tree = [{"type": "file", "path": f, "size": 10, "oid": "1" * 40} for f in files]
                    return self._answer(200, _json.dumps(tree).encode())
                if path.startswith("/api/models/org/gated"):
                    info = {"id": "org/gated", "modelId": "org/gated", "sha": "0" * 40, "private": False,
                            "gated": "manual", "siblings": [{"rfilename": f} for f in files]}
                    return self._answer(200, _json.dumps(info).encode())
                if path.startswith("/org/gated/resolve/"):
                    message = ("Access to model org/gated is restricted and you are not in the authorized list."
                               if auth else "Access to model org/gated is restricted. You must have access to it "
                               "and be authenticated to access it. Please log in.")
                    return self._answer(403 if auth else 401, _json.dumps({"error": message}).encode(), {
                        "X-Error-Code": "GatedRepo", "X-Error-Message": message})
                return self._answer(404 if auth else 401, b'{"error": "Repository not found"}', {
                    "X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_hub(tmp_path):
    hub = _FakeHub()
    yield hub
    hub.close()


def _download_online(hub: _FakeHub, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_HUB_OFFLINE="0", HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf_home"))  # no saved token either
    return subprocess.run([sys.executable, "-m", "litft", "download", *args, "--checkpoint_dir", str(tmp_path / "ck")],
                          capture_output=True, text=True, timeout=120, env=env)


def test_gated_repo_without_token_says_how_to_get_access(fake_hub, tmp_path):
    r = _download_online(fake_hub, tmp_path, "org/gated")
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("litft download: error: org/gated is a gated repo: accept its licence at "
                               f"{fake_hub.url}/org/gated, then pass --access_token <token> or set HF_TOKEN"), r.stderr
    assert "Traceback" not in r.stderr
    assert fake_hub.requests and not any("/resolve/" in p for _, p, _ in fake_hub.requests)  # nothing fetched
    assert not (tmp_path / "ck").exists()


def test_gated_repo_with_a_token_without_access(fake_hub, tmp_path):
    r = _download_online(fake_hub, tmp_path, "org/gated", "--access_token", "hf_no_access")
    assert r.returncode == 1, r.stderr
    assert ("org/gated is a gated repo and your token has no access to it: accept its licence at "
            f"{fake_hub.url}/org/gated with the account the token belongs to") in r.stderr, r.stderr
    assert any("/resolve/" in p and auth for _, p, auth in fake_hub.requests)  # the file request was refused (403)
    assert not (tmp_path / "ck").exists()


def test_unknown_repo_is_named_with_close_names(fake_hub, tmp_path):
    r = _download_online(fake_hub, tmp_path, "meta-llama/Llama-3.2-1B-Instrct")
    assert r.returncode == 1, r.stderr
    assert (f"repository 'meta-llama/Llama-3.2-1B-Instrct' not found on the Hugging Face Hub "
            f"({fake_hub.url}/meta-llama/Llama-3.2-1B-Instrct) or it is private: pass --access_token") in r.stderr
    assert "Did you mean: meta-llama/Llama-3.2-1B-Instruct" in r.stderr and "Traceback" not in r.stderr
    r = _download_online(fake_hub, tmp_path, "org/missing", "--access_token", "hf_valid")  # 404 with a token
    assert r.returncode == 1 and "not found on the Hugging Face Hub" in r.stderr
    assert "your token cannot see it" in r.stderr
    assert not (tmp_path / "ck").exists()


def test_invalid_token_is_named(fake_hub, tmp_path):
    r = _download_online(fake_hub, tmp_path, "org/gated", "--access_token", "hf_invalid")
    assert r.returncode == 1, r.stderr
    assert "refused access to org/gated (HTTP 401): the token is invalid, expired or lacks read access" in r.stderr
    assert not (tmp_path / "ck").exists()
