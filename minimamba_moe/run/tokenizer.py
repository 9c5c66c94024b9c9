"""Tokenizers, named by one string that checkpoints store in config.json ("tokenizer": spec).

    "bytes"                      UTF-8 bytes, vocab 256 (the tiny preset; no files, no network)
    "gpt2"                       tiktoken's GPT-2 BPE (vocab 50257; downloaded once by tiktoken)
    path/to/file.tiktoken        GPT-2's split pattern with the BPE ranks in that file (offline)
    path/to/tokenizer.json       a Hugging Face tokenizer, e.g. GPT-NeoX's for BlackMamba
                                 (needs the optional `tokenizers` package)

StreamDecoder(tokenizer) turns token ids, fed one at a time, into text safe to print as it comes
(sample.py's streaming output).
"""

from __future__ import annotations

import codecs
import os


class TokenizerError(ValueError):
    """A tokenizer cannot be loaded; the message says what to do instead."""


class ByteTokenizer:
    name = "bytes"
    vocab_size = 256
    eot_token = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: list[int]) -> bytes:
        return bytes(ids)


# GPT-2's pre-tokenisation pattern, as in tiktoken's own gpt2 definition.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class TiktokenTokenizer:
    def __init__(self, spec: str):
        import tiktoken

        self.name = spec
        if spec == "gpt2":
            try:
                self.enc = tiktoken.get_encoding("gpt2")
            except Exception as e:  # tiktoken downloads its files on first use
                raise TokenizerError(
                    f"tiktoken could not load the GPT-2 encoding ({type(e).__name__}): this machine seems to be "
                    "offline. Pass --tokenizer=path/to/gpt2.tiktoken (the BPE ranks file), or use --tokenizer=bytes."
                ) from None
        else:
            from tiktoken.load import load_tiktoken_bpe

            try:
                ranks = load_tiktoken_bpe(spec)
            except Exception:  # the message would quote the file's first line: say what it should be instead
                raise TokenizerError(f"{spec} is not a tiktoken BPE ranks file (lines of base64 token, space, rank); "
                                     "use 'bytes', 'gpt2', a .tiktoken file or a tokenizer.json.") from None
            if not ranks:
                raise TokenizerError(f"{spec} is an empty tiktoken ranks file.")
            self.enc = tiktoken.Encoding(
                name=os.path.basename(spec), pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                special_tokens={"<|endoftext|>": len(ranks)},
            )
        self.vocab_size = self.enc.n_vocab
        self.eot_token = self.enc.eot_token

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.enc.decode_bytes(ids)


class HFTokenizer:
    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise TokenizerError(
                f"{path} is a Hugging Face tokenizer file; install the optional extra to read it: "
                "pip install -e '.[hf]' (the `tokenizers` package)."
            ) from None
        self.name = path
        try:
            self.tok = Tokenizer.from_file(path)
        except Exception:  # its message may quote the file: say what it should be instead
            raise TokenizerError(f"{path} is not a Hugging Face tokenizer.json file (as saved by the `tokenizers` "
                                 "package); use 'bytes', 'gpt2' or a .tiktoken file otherwise.") from None
        self.vocab_size = self.tok.get_vocab_size()
        self.eot_token = self.tok.token_to_id("<|endoftext|>")

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.decode(ids).encode("utf-8")


def load_tokenizer(spec: str):
    """The tokenizer a spec string names (see the module docstring)."""
    if spec == "bytes":
        return ByteTokenizer()
    if spec == "gpt2":
        return TiktokenTokenizer(spec)
    if not os.path.isfile(spec):
        raise TokenizerError(
            f"Unknown tokenizer {spec!r}: use 'bytes', 'gpt2', or the path of a .tiktoken or tokenizer.json file."
        )
    if spec.endswith(".json"):
        return HFTokenizer(spec)
    return TiktokenTokenizer(spec)


# --8<-- [start:StreamDecoder]
class StreamDecoder:
    """Turn token ids, fed one at a time, into text that is safe to print as it comes.

    A token may end in the middle of a UTF-8 character (often, with the byte tokenizer; sometimes,
    with byte-level BPE such as GPT-2's and GPT-NeoX's). Decoding it alone would print U+FFFD, so:

    - tokenizers that give a token's exact bytes (bytes, tiktoken) feed them to an incremental
      UTF-8 decoder, which holds an unfinished character back until its last byte arrives; the
      printed text is exactly ``tokenizer.decode(all tokens)``;
    - a Hugging Face tokenizer only gives text, so tokens wait in ``pending`` while their decoding
      ends in U+FFFD, at most 4 of them (the longest UTF-8 character is 4 bytes).
    """

    MAX_PENDING = 4

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.exact_bytes = not isinstance(tokenizer, HFTokenizer)  # its decode_bytes goes through text
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending: list[int] = []

    def push(self, token: int) -> str:
        """Add one token; return the text that is now complete ("" while a character is unfinished)."""
        if self.exact_bytes:
            return self.utf8.decode(self.tokenizer.decode_bytes([int(token)]))
        self.pending.append(int(token))
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < self.MAX_PENDING:
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        """Whatever is still held back, decoded as it is."""
        if self.exact_bytes:
            return self.utf8.decode(b"", final=True)
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return text
# --8<-- [end:StreamDecoder]
