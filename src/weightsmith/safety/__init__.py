"""Safety in the open: red-team probes, detectors, guardrail policies and bias audits.

Layout:
  encodings.py   base64 / rot13 / leetspeak: encode (attacks) and decoded views (defence)
  pack_files.py  probe pack and transforms files as records (weightsmith.config.records)
  probes.py      probe packs (YAML/JSONL) -> `Probe`s
  transforms.py  encodings, suffixes and templates that compose with any attack probe
  detectors.py   refusal (patterns, judge), planted-secret leaks, policy violation (judge)
  calibrate.py   a detector's precision/recall on the shipped hand-labelled calibration sets
  policy.py      `Guard`: a loaded policy's input/output rails, redaction and refusals
  policy_file.py policy files as records (rules: a tagged union on type:) and their checks
  rails.py       the rules' matchers and PII kinds
  guarded.py     applying a `Guard` around generation (chat, generate, serve)
  redteam.py     run probes against targets (in-process or an OpenAI endpoint), score, ASR
                 and over-refusal with Wilson intervals, transcripts and report
  split.py       the stable sha256 train / held-out split of probes
  redteam_pairs.py  DPO preference pairs from a run's replies (refuse attacks, keep helping)
  redteam_compare.py  two runs before/after on the same probes: Wilson, Newcombe, exact McNemar
  bias_files.py  lexicon and stereotype-pair files as records, and `Lexicon`
  bias.py        counterfactual audits over eval tasks, CrowS-style pair likelihoods
Data: packs/, calibration/, policies/, lexicons/, pairs/ (all written for this project).
"""
