"""The released BlackMamba by name: Zyphra's repositories on the Hugging Face hub, and one loader for every name.

    fetch_blackmamba("Zyphra/BlackMamba-1.5B")     -> ZyphraFiles(weights, config, tokenizer): local paths
    load_blackmamba(id_or_path, tokenizer, ...)     -> (Model, tokenizer, tokenizer spec)
    load_pretrained(name, device, dtype)            -> (Model, tokenizer): a checkpoint folder of ours,
                                                       a hub id, or a pytorch_model.bin
    pick_device, pick_dtype, pick_batch_size        the settings the harness and the perplexity command take

What is fetched (docs/paper-facts.md#released-checkpoints says where these names come from):
``config.json`` and ``pytorch_model.bin`` from the BlackMamba repository, and ``tokenizer.json`` from
EleutherAI/gpt-neox-20b. ``huggingface_hub.hf_hub_download`` does the fetching: into the standard
hub cache (``HF_HOME``, ``HF_HUB_CACHE``), with its own progress bars and its own all-or-nothing
writes (a ``.incomplete`` file renamed when whole), and from that cache alone under
``HF_HUB_OFFLINE=1``. The small files come first: a repository whose config.json is not BlackMamba's
is refused before its weights are downloaded, and that config.json must agree with the weights'
shapes (``check_zyphra_config``).

A name is a hub id when it is no file or folder here and has the form ``owner/name`` (not ending in
.bin, .pt or .safetensors); anything else is a path, read as before.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch

from minimamba_moe.config import ModelConfig
from minimamba_moe.model import Model
from minimamba_moe.run.checkpoint import CONFIG, load_model, read_config, recover_interrupted_save
from minimamba_moe.run.memory import check_fits, inference_memory
from minimamba_moe.run.tokenizer import load_tokenizer
from minimamba_moe.interop.convert import DEFAULT_ACTIVATION, ConversionError, load_zyphra

BLACKMAMBA_REPOS = ("Zyphra/BlackMamba-1.5B", "Zyphra/BlackMamba-2.8B")  # the authors' README, "Pretrained Models"
WEIGHTS_FILE = "pytorch_model.bin"  # transformers' WEIGHTS_NAME, which the released hf_utils.py fetches
CONFIG_FILE = "config.json"  # transformers' CONFIG_NAME, read by the released MambaModel.from_pretrained
TOKENIZER_REPO = "EleutherAI/gpt-neox-20b"
TOKENIZER_FILE = "tokenizer.json"
# the keys the released MambaModel.from_pretrained reads from config.json (a KeyError there without any)
ZYPHRA_CONFIG_KEYS = ("num_layers", "hidden_size", "state_size", "conv_dimension", "vocab_size", "expansion_factor",
                      "mamba_moe_layers", "ffn_hidden_size", "add_bias_linear", "swiglu", "max_sequence_length")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SettingError(ValueError):
    """A device, dtype or batch size that cannot be used here; the message says which."""


class HubError(ConversionError):
    """A hub id that cannot be fetched or is not BlackMamba's; the message says what to do."""


@dataclass
class ZyphraFiles:
    weights: str
    config: str
    tokenizer: str


def is_hub_id(spec: str) -> bool:
    """``owner/name`` that is not a file or folder here (and does not end like a weights file)."""
    return (not os.path.exists(spec) and HUB_ID.fullmatch(spec) is not None
            and not spec.lower().endswith(WEIGHT_SUFFIXES))


def download(repo_id: str, filename: str) -> str:
    """``hf_hub_download`` into the hub cache (its progress bars, its atomic writes); errors in one sentence."""
    try:
        import huggingface_hub
        from huggingface_hub import constants, errors
    except ImportError:
        raise HubError(f"Fetching {repo_id} needs the huggingface_hub package: pip install 'minimamba-moe[hf]' "
                       "(or pass a downloaded pytorch_model.bin with --tokenizer).") from None
    cache = constants.HF_HUB_CACHE
    try:
        return huggingface_hub.hf_hub_download(repo_id, filename)
    except errors.LocalEntryNotFoundError:
        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hugging Face hub cannot be reached")
        raise HubError(f"Cannot get {filename} of {repo_id}: {why} and it is not in the hub cache {cache}; connect "
                       "once (it stays in the cache), or pass a downloaded pytorch_model.bin with --tokenizer.") from None
    except errors.GatedRepoError:
        raise HubError(f"{repo_id} is gated on the Hugging Face hub: accept its terms on its page and log in "
                       "(hf auth login).") from None
    except errors.RepositoryNotFoundError:
        raise HubError(f"There is no repository {repo_id} on the Hugging Face hub (or it is private); the released "
                       f"BlackMamba repositories are {' and '.join(BLACKMAMBA_REPOS)}.") from None
    except (errors.RemoteEntryNotFoundError, errors.EntryNotFoundError):
        raise HubError(f"{repo_id} has no {filename}: not a released BlackMamba repository (those are "
                       f"{' and '.join(BLACKMAMBA_REPOS)}).") from None
    except (errors.HfHubHTTPError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f"Cannot get {filename} of {repo_id} from the Hugging Face hub ({first}).") from None


def read_zyphra_config(path: str, repo_id: str) -> dict:
    """config.json of a BlackMamba repository, refused unless it holds every key the released loader reads."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        raise HubError(f"{repo_id}'s {CONFIG_FILE} ({path}) is not a JSON file; delete it from the hub cache and "
                       "fetch it again.") from None
    missing = [k for k in ZYPHRA_CONFIG_KEYS if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise HubError(f"{repo_id} is not a BlackMamba repository: its {CONFIG_FILE} has no {', '.join(missing)} "
                       f"(the released ones are {' and '.join(BLACKMAMBA_REPOS)}).")
    return cfg


def check_zyphra_config(cfg: dict, config: ModelConfig, where: str) -> None:
    """Refuse a released config.json whose sizes differ from those read off the weights' shapes."""
    layers = cfg["mamba_moe_layers"]
    expected = {"num_layers": config.n_layer, "hidden_size": config.d_model, "state_size": config.d_state,
                "conv_dimension": config.d_conv, "expansion_factor": config.expand,
                "ffn_hidden_size": config.d_expert, "vocab_size": config.padded_vocab_size}
    problems = [f"{k} = {cfg[k]!r} but the weights have {v}" for k, v in expected.items() if cfg[k] != v]
    kinds = ["mamba" if str(x).startswith("r") else "moe" for x in layers] if isinstance(layers, list) else None
    if kinds != list(config.layer_kinds):
        problems.append(f"mamba_moe_layers = {layers!r} does not alternate Mamba ('r') and MoE layers as the weights do")
    if problems:
        raise HubError(f"{where}: config.json and pytorch_model.bin disagree: {'; '.join(problems)}.")


def fetch_blackmamba(repo_id: str) -> ZyphraFiles:
    """config.json (checked first), GPT-NeoX's tokenizer.json, then pytorch_model.bin; local paths in the cache."""
    config = download(repo_id, CONFIG_FILE)
    read_zyphra_config(config, repo_id)  # not BlackMamba's: refused before gigabytes of weights
    tokenizer = download(TOKENIZER_REPO, TOKENIZER_FILE)
    weights = download(repo_id, WEIGHTS_FILE)
    return ZyphraFiles(weights, config, tokenizer)


def load_blackmamba(spec: str, tokenizer: str | None = None, activation: str = DEFAULT_ACTIVATION,
                    dtype: torch.dtype | None = None) -> tuple[Model, object, str]:
    """(model, tokenizer, tokenizer spec) from a hub id (everything fetched) or a pytorch_model.bin path
    (``tokenizer`` required: the path of GPT-NeoX's tokenizer.json)."""
    files = fetch_blackmamba(spec) if is_hub_id(spec) else None
    spec_tok = tokenizer or (files.tokenizer if files else None)
    if spec_tok is None:
        raise HubError(f"{spec} is a weights file: give the tokenizer too (GPT-NeoX's tokenizer.json, from "
                       f"{TOKENIZER_REPO}), or name a hub repository such as {BLACKMAMBA_REPOS[0]}.")
    tok = load_tokenizer(spec_tok)
    model = load_zyphra(files.weights if files else spec, activation, tok, dtype)
    if files:
        check_zyphra_config(read_zyphra_config(files.config, spec), model.config, spec)
    return model, tok, spec_tok


def pick_device(device) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError):
        raise SettingError(f"device {device} is not available here; use cpu or cuda.") from None
    return device


def pick_dtype(dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if str(dtype) not in DTYPES:
        raise SettingError(f"dtype {dtype}: expected auto, {', '.join(DTYPES)}.")
    return DTYPES[str(dtype)]


def pick_batch_size(batch_size) -> int:
    try:
        n = int(batch_size)
    except (TypeError, ValueError):
        raise SettingError(f"batch size {batch_size}: give a number of sequences per forward (automatic "
                           "sizing is not supported here).") from None
    if n < 1:
        raise SettingError(f"batch size {batch_size}: expected at least 1.")
    return n


def load_pretrained(name: str, device: torch.device, dtype: torch.dtype, tokenizer: str | None = None,
                    activation: str = DEFAULT_ACTIVATION) -> tuple[Model, object]:
    """(model in eval mode on ``device``, tokenizer) from one name: a checkpoint folder of this project
    (train.py's or a conversion), a BlackMamba hub id, or a pytorch_model.bin (with ``tokenizer``)."""
    if os.path.isdir(name) and os.path.isfile(os.path.join(name, CONFIG)):
        recover_interrupted_save(name)  # as sample.py and train.py --resume do, before anything reads it
        config, _ = read_config(name)
        check_fits(inference_memory(config, dtype), device, lower="this checkpoint's config.json describes a model "
                   "too big for this machine")
        model, extra = load_model(name, device, dtype)
        spec = tokenizer or extra.get("tokenizer")
        if spec is None:
            raise ConversionError(f"{name}/config.json names no tokenizer; give one (bytes, gpt2, a tokenizer.json).")
        return model.eval(), load_tokenizer(spec)
    if os.path.isdir(name):
        raise ConversionError(f"{name} is a folder without a checkpoint ({CONFIG}): give a folder train.py or "
                              f"sample.py --save_converted wrote, a hub id such as {BLACKMAMBA_REPOS[0]}, or a "
                              "pytorch_model.bin.")
    if not os.path.exists(name) and not is_hub_id(name):
        raise ConversionError(f"No checkpoint at {name}: give a checkpoint folder (train.py's, or sample.py "
                              f"--save_converted's), a hub id such as {BLACKMAMBA_REPOS[0]}, or a pytorch_model.bin.")
    model, tok, _ = load_blackmamba(name, tokenizer, activation, dtype)
    return model.to(device).eval(), tok
