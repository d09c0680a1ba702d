"""A YAML loader that refuses a key given twice in one mapping.

``yaml.safe_load`` keeps the last of two equal keys without a word, so a config file holding
``lr: 1e-3`` and, further down, ``lr: 2e-3`` ran with 2e-3 while the first line was the one read.
``UniqueKeySafeLoader`` is ``yaml.SafeLoader`` that raises a ``ConstructorError`` at the second
occurrence (its line and column in ``problem_mark``), which ``rlhf.config`` turns into its
one-line "not valid YAML at line N" error.
"""

from __future__ import annotations

import yaml

__all__ = ["UniqueKeySafeLoader"]


class UniqueKeySafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` refusing duplicate keys in a mapping (at any depth)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`, merged below
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: the base loader says what is wrong
                    continue
                if first is not key_node:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark,
                        f"the key {key!r} is given twice (first at line "
                        f"{first.start_mark.line + 1}); keep one", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)
