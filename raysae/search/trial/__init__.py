"""The code that runs inside each trial, in a Ray worker (the trial side of a search): what a
trial is (``spec``), the Tune function trainable (``trainable``), its members' evaluation and
artifacts (``members``), its rung scores (``rungs``) and its checkpoint scratch folders
(``scratch``). It imports the core, evaluation, activations, LM, results and the search's
settings (plain data), never the driver's modules (stages, jobs, Tune set-up, the results
table) and never analysis: tests/test_layout.py checks it."""
