"""The `data` section of every recipe config (configs/*.py reach it as `cfg.data`).

Every key exists in the default so `--config.data.x=y` overrides work under `lock_config`. The
embedded defaults train and evaluate offline on the built-in arithmetic task with the byte
tokenizer, so a recipe runs with no files at all.
"""
import ml_collections

ON_ERROR = ("raise", "drop")
OVERLONG = ("truncate_left", "truncate_right", "drop")
LOSS_ON = ("completion", "assistant", "all")
RL_PADDING = ("left", "right")
KINDS = ("sft", "pairwise", "unpaired", "rl")


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Source specs: a .jsonl / .parquet path or glob, `jsonl:GLOB`, `parquet:GLOB`,
  # `arrayrecord:GLOB` (records are JSON bytes), `tfds:NAME[:SPLIT]`, `builtin:arithmetic[:SPLIT]`.
  c.train = "builtin:arithmetic:train"
  c.eval = "builtin:arithmetic:heldout"   # '' = no evaluation set
  c.tfds_data_dir = ""                    # data_dir for `tfds:` sources ('' = TFDS default)
  # 'byte' (built-in, 259 ids) or 'hf:DIR' (tokenizer.json + tokenizer_config.json).
  c.tokenizer = "byte"
  # Render plain-string prompt/completion rows through the chat template too (user turn +
  # assistant turn). Conversational rows (message lists) always use the template.
  c.chat_template = False
  # SFT: which tokens are trained on: 'completion' (after the prompt; for `messages`, the final
  # assistant turn(s)), 'assistant' (every assistant turn), 'all' (every token but the first).
  # Pairwise / unpaired data always use the completion; `text` rows train on every token.
  c.loss_on = "completion"
  # T: tokens per row (one sequence, or one packed row). Rows are padded to T, so keep it near
  # the data: built-in arithmetic needs <= 10 tokens (<= 34 through the byte chat template).
  c.max_len = 40
  c.overlong = "truncate_left"            # truncate_left | truncate_right | drop
  c.max_prompt_len = 0                    # RL prompt batches: prompt width (0 = max_len)
  c.rl_padding = "left"                   # RL prompt batches: 'left' (for generation) | 'right'
  c.pack = False                          # first-fit packing (sft, pairwise)
  c.max_examples_per_batch = 0            # packed: example slots per global batch (0 = 4 x batch)
  c.shuffle = True
  c.num_epochs = 0                        # 0 = repeat forever (training runs count steps)
  c.drop_remainder = False                # finite epochs: drop the last partial batch (else pad)
  # A row that fails validation (bad JSON, missing field, empty completion, chosen == rejected,
  # wrong type, prompt/completion boundary): 'raise' stops at start listing every bad row;
  # 'drop' reports them and trains on the rest. Over-length rows follow `overlong` instead.
  c.on_error = "raise"
  return c


def check(data_cfg) -> None:
  """Fails early, naming the key, when a config value is outside its allowed set."""
  for key, allowed in (("on_error", ON_ERROR), ("overlong", OVERLONG), ("loss_on", LOSS_ON),
                       ("rl_padding", RL_PADDING)):
    value = data_cfg[key]
    if value not in allowed:
      raise ValueError(f"data.{key}={value!r}: expected one of {', '.join(allowed)}")
  if data_cfg.max_len < 2:
    raise ValueError(f"data.max_len={data_cfg.max_len}: needs at least 2 tokens")


def check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise ValueError(f"data kind {kind!r}: expected one of {', '.join(KINDS)}")
