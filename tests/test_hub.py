"""The released BlackMamba by name (minimamba_moe/interop/hub.py, sample.py --zyphra ID), offline.

Each test builds a Hugging Face hub cache the way huggingface_hub lays it out (blobs, refs/main,
snapshots/<commit>/<file> linking to a blob: ``tests.helpers.hub_cache``) holding tiny synthetic files
under the real repository ids, and runs with ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` pointing at it:
the real ``hf_hub_download`` resolves them, the real converter reads them. The weights are
tests/test_convert.py's synthetic BlackMamba (the released key layout, bf16), the tokenizer a toy
byte-level BPE tokenizer.json. Needs the `hf` extra (huggingface_hub, tokenizers).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.needs_extra("hf")  # skipped naming the extra without it (tests/conftest.py)

from minimamba_moe.config import ModelConfig  # noqa: E402
from minimamba_moe.interop import convert, hub  # noqa: E402
from minimamba_moe.generate import generate  # noqa: E402
from minimamba_moe.run.checkpoint import load_model  # noqa: E402
from minimamba_moe.run.tokenizer import load_tokenizer  # noqa: E402
from tests.helpers import byte_level_bpe_tokenizer, hub_cache  # noqa: E402
from tests.test_harness import needs_eval  # noqa: E402
from tests.test_convert import synthetic_zyphra  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = hub.BLACKMAMBA_REPOS[0]


def zyphra_config(config: ModelConfig) -> dict:
    """config.json as the released repositories hold it (the keys MambaModel.from_pretrained reads)."""
    return {"num_layers": config.n_layer, "hidden_size": config.d_model, "state_size": config.d_state,
            "conv_dimension": config.d_conv, "vocab_size": config.padded_vocab_size, "expansion_factor": config.expand,
            "mamba_moe_layers": ["r" if k == "mamba" else str(config.n_experts) for k in config.layer_kinds],
            "ffn_hidden_size": config.d_expert, "add_bias_linear": False, "swiglu": True,
            "max_sequence_length": config.max_seq_len}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(folder with pytorch_model.bin and tokenizer.json, their bytes, the synthetic model's config.json)."""
    root = tmp_path_factory.mktemp("zyphra")
    sd = synthetic_zyphra()
    torch.save({"model": sd}, root / "pytorch_model.bin")
    byte_level_bpe_tokenizer(root / "tokenizer.json")
    config = convert.infer_config(sd, vocab_size=300)
    return root, json.dumps(zyphra_config(config)).encode()


@pytest.fixture
def cache(tmp_path, files):
    """A hub cache holding the BlackMamba repository and GPT-NeoX's tokenizer.json."""
    root, config_json = files
    cache = tmp_path / "hub"
    hub_cache(cache, REPO, {"config.json": config_json, "pytorch_model.bin": (root / "pytorch_model.bin").read_bytes()})
    hub_cache(cache, hub.TOKENIZER_REPO, {"tokenizer.json": (root / "tokenizer.json").read_bytes()})
    return cache


def env_for(cache, offline=True, **more):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_CACHE=str(cache), OMP_NUM_THREADS="1", HF_HUB_DISABLE_TELEMETRY="1", **more)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


COMMON = ["--prompt", "the cat", "--max_new_tokens", "6", "--temperature", "0", "--dtype", "float32"]


def run_sample(*args, env):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args, *COMMON], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)


@pytest.fixture
def sample_here(monkeypatch, capsys):
    """sample.py's main in this process (as its command line runs it: run_main), with huggingface_hub's two
    settings that HF_HUB_OFFLINE and HF_HUB_CACHE set at its import set here instead: (exit status, stdout, stderr)."""
    from huggingface_hub import constants

    sys.path.insert(0, ROOT)
    import sample
    from minimamba_moe.run.cli import run_main

    def run(*args, cache):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        code = run_main(sample.main, [*args, *COMMON], "sample.py", (sample.UsageError,), sample.ERRORS)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def one_line_error(result, needle):
    code, out, err = result
    assert code == 1 and not out, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sample.py: error: ") and needle in lines[0], err


def test_sample_py_fetches_blackmamba_by_name_from_the_hub_cache(cache, files, tmp_path):
    """`sample.py --zyphra Zyphra/BlackMamba-1.5B` under HF_HUB_OFFLINE=1: the greedy text of the same weights
    converted from their path; --save_converted writes them with the cached tokenizer.json named."""
    root, _ = files
    r = run_sample("--zyphra", REPO, "--save_converted", str(tmp_path / "c"), env=env_for(cache))
    assert r.returncode == 0, r.stderr
    assert f"{REPO}: BlackMamba preset custom" in r.stderr
    tok = load_tokenizer(str(root / "tokenizer.json"))
    direct = convert.load_zyphra(root / "pytorch_model.bin", tokenizer=tok, dtype=torch.float32)
    ids = generate(direct, torch.tensor([tok.encode("the cat")]), 6, temperature=0)[0].tolist()
    assert r.stdout == tok.decode(ids) + "\n"
    saved, extra = load_model(tmp_path / "c")
    assert extra["tokenizer"].startswith(str(cache)) and extra["tokenizer"].endswith("tokenizer.json")
    assert saved.state_dict().keys() == direct.state_dict().keys()
    assert all(torch.equal(v, direct.state_dict()[k]) for k, v in saved.state_dict().items())


def test_not_in_the_cache_offline_one_line_nothing_written(tmp_path, sample_here):
    result = sample_here("--zyphra", REPO, "--save_converted", str(tmp_path / "c"), cache=tmp_path / "empty")
    one_line_error(result, f"Cannot get config.json of {REPO}: HF_HUB_OFFLINE is set and it is not in the hub cache")
    assert not list(tmp_path.iterdir()), "nothing may be left behind"


@pytest.mark.slow  # huggingface_hub retries 5 times over about 25 s before it gives up
def test_hub_unreachable_one_line_after_the_librarys_retries(tmp_path):
    env = env_for(tmp_path / "empty", offline=False, HF_ENDPOINT="http://127.0.0.1:9")
    r = run_sample("--zyphra", REPO, "--save_converted", str(tmp_path / "c"), env=env)
    assert r.returncode == 1 and not r.stdout and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]  # after huggingface_hub's own "Retrying in ..." notices
    assert last.startswith(f"sample.py: error: Cannot get config.json of {REPO}: the Hugging Face hub cannot be "
                           "reached"), r.stderr
    assert not (tmp_path / "c").exists()


def test_a_repository_that_is_not_blackmamba_is_refused_before_its_weights(tmp_path, files, sample_here):
    cache = tmp_path / "hub"
    hub_cache(cache, "EleutherAI/pythia-14m", {"config.json": b'{"architectures": ["GPTNeoXForCausalLM"]}'})
    result = sample_here("--zyphra", "EleutherAI/pythia-14m", "--save_converted", str(tmp_path / "c"), cache=cache)
    one_line_error(result, "EleutherAI/pythia-14m is not a BlackMamba repository: its config.json has no num_layers")
    assert not (tmp_path / "c").exists()
    root, config_json = files  # BlackMamba's config.json, but no weights in the (offline) cache: named
    hub_cache(cache, "someone/BlackMamba-copy", {"config.json": config_json})
    hub_cache(cache, hub.TOKENIZER_REPO, {"tokenizer.json": (root / "tokenizer.json").read_bytes()})
    result = sample_here("--zyphra", "someone/BlackMamba-copy", cache=cache)
    one_line_error(result, "Cannot get pytorch_model.bin of someone/BlackMamba-copy: HF_HUB_OFFLINE is set")


def test_without_the_hf_extra_one_line_names_it(cache, sample_here, monkeypatch):
    from huggingface_hub import constants  # noqa: F401  (sample_here patches it before the package is hidden)

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # `import huggingface_hub` raises ImportError
    one_line_error(sample_here("--zyphra", REPO, cache=cache),
                   "needs the huggingface_hub package: pip install 'minimamba-moe[hf]'")


def test_a_config_json_that_disagrees_with_the_weights_is_refused(tmp_path, files, sample_here):
    root, config_json = files
    bad = {**json.loads(config_json), "hidden_size": 64}
    cache = tmp_path / "hub"
    hub_cache(cache, REPO, {"config.json": json.dumps(bad).encode(),
                            "pytorch_model.bin": (root / "pytorch_model.bin").read_bytes()})
    hub_cache(cache, hub.TOKENIZER_REPO, {"tokenizer.json": (root / "tokenizer.json").read_bytes()})
    one_line_error(sample_here("--zyphra", REPO, cache=cache),
                   "config.json and pytorch_model.bin disagree: hidden_size = 64 but the weights have 32")


@needs_eval
def test_the_harness_model_takes_the_hub_id(cache, files, monkeypatch, one_thread):
    """--model_args pretrained=Zyphra/BlackMamba-1.5B: the same fetch, the converted weights, GPT-NeoX's tokenizer."""
    from huggingface_hub import constants
    from lm_eval.api.instance import Instance

    from minimamba_moe.interop.harness import MinimambaLM

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    lm = MinimambaLM(pretrained=REPO, device="cpu")
    root, _ = files
    tok = load_tokenizer(str(root / "tokenizer.json"))
    direct = convert.load_zyphra(root / "pytorch_model.bin", tokenizer=tok, dtype=torch.float32)
    assert lm.tok.vocab_size == tok.vocab_size and lm.eot_token_id == tok.eot_token
    assert all(torch.equal(v, direct.state_dict()[k]) for k, v in lm.model.state_dict().items())
    [(ll, _)] = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=("the cat", " sat"), idx=0)],
                                 disable_tqdm=True)
    assert ll < 0


def test_names_and_paths():
    assert hub.is_hub_id("Zyphra/BlackMamba-2.8B") and hub.is_hub_id("someone/my.model_v2")
    for path in ("BlackMamba-1.5B/pytorch_model.bin", "weights.safetensors", "/abs/path", "gpt2", "a/b/c", "."):
        assert not hub.is_hub_id(path), path


def test_the_ids_and_file_names_fit_the_converter_and_the_paper_facts():
    """Each released id names the preset the converter matches its shapes to; a config.json with those
    sizes passes check_zyphra_config; docs/paper-facts.md gives the same ids and file names."""
    assert [r.split("/")[1].lower() for r in hub.BLACKMAMBA_REPOS] == list(convert.MATCHED_PRESETS)
    for name in convert.MATCHED_PRESETS:
        shapes = convert.zyphra_shapes(ModelConfig.from_preset(name))
        config = convert.infer_config({k: torch.empty(s, device="meta") for k, s in shapes.items()}, vocab_size=50277)
        assert config.name == name
        hub.check_zyphra_config(zyphra_config(config), config, name)
    facts = open(os.path.join(ROOT, "docs", "paper-facts.md"), encoding="utf-8").read()
    for s in (*hub.BLACKMAMBA_REPOS, hub.WEIGHTS_FILE, hub.CONFIG_FILE, hub.TOKENIZER_REPO, hub.TOKENIZER_FILE,
              *hub.ZYPHRA_CONFIG_KEYS):
        assert s in facts, f"docs/paper-facts.md does not name {s}"
