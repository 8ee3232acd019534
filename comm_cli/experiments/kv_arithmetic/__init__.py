"""The paper's key-value arithmetic experiment (CALM section 4.1), the default job.

- ``world``: random keys, their values, the composition / held-out split;
- ``tasks``: the example formats (arithmetic, lookup, kv_arithmetic, ...) and answer reading;
- ``specialists``: building the augment (knows every key) and the anchor (arithmetic only);
- ``config``: its config sections (``kv``, ``data.kv``);
- ``data``: the generator behind ``data.synthetic=kv_arithmetic``;
- ``setup``: builds the specialists on first use (``prepare``);
- ``demo``: ``make demo``, the whole table.
"""
