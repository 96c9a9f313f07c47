"""Quality under the pinned protocol: perplexity, bits per byte, KL from a base model, top-1 agreement."""

from unweight.eval.perplexity import DEFAULT_SEQ_LEN, EvalResult, evaluate, token_windows

__all__ = ["DEFAULT_SEQ_LEN", "EvalResult", "evaluate", "token_windows"]
