"""``lora-lite compare``: train several variants under the same settings and compare them.

``plan`` turns the command line into one job per (variant, seed), each with a settings
fingerprint; ``sweep`` runs the jobs whose result is not stored yet, each in its own process
(``worker``: one ``training.run``, so peak memory is that variant's alone), and shares the base
model's evaluation between them; ``results`` gathers the stored results into results.json and
results.md; ``report`` writes the self-contained report.html.
"""
