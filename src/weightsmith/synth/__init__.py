"""Synthetic training data: self-instruct, evolution, grounded Q&A from the user's documents,
and answer distillation, generated in process or on an endpoint, filtered (format, refusals,
near-duplicates, an LLM judge, eval-set contamination) and written as chat JSONL that
`weightsmith finetune` reads, with its funnel, report and lineage. Runs resume.

  rouge.py       ROUGE-L (rouge-score's) and the near-duplicate index
  docs.py        reading and chunking documents
  prompts.py     the prompt templates (files in prompts/, replaceable)
  generation.py  in-process and endpoint generators
  recipes.py     what each recipe asks
  filters.py     format, refusal, boilerplate and contamination checks
  pipeline.py    one step through every filter; the run loop
  store.py       the resumable work folder
  output.py      train/validation split, funnel.json, lineage.json

Not here: the command (weightsmith.commands.synth), the HTML (weightsmith.report.synth_report).
"""
