"""What a registration module returns."""

import dataclasses


@dataclasses.dataclass
class Registered:
  lm: dict  # language code -> LM task name
  mt: dict  # "src-tgt" -> conditional task name
