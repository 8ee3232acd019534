"""The pieces of ``scripts/bench.py``, one job each (the entry's docstring says what is measured).

models.py        the random anchor and augment a benchmark builds from its settings, composed
measure.py       timing (interleaved, median) and peak memory (CUDA counter or a child's RSS)
variants.py      the steps and decoders every case times, over one set of frozen weights
text_case.py     the default case: every token carries loss; LoRA and decoding beside it
prompt_case.py   prompt/completion rows at a large vocab: the chunked loss against every logit
bpe_text.py      random text and a byte-level BPE trained on it (the aligned case's tokenizer)
aligned_case.py  the character alignment's cost: aligned and character augments against shared ids
sweep.py         step time and memory against sequence length and connections (``--sweep``)
plot.py          the sweep's picture (matplotlib, an optional extra)
report.py        the printed table, the JSON record, MFU, the device's name
"""
