"""Reports: run directories (and the policy evaluations beside them) -> PNG plots in one self-contained HTML page.

rlhf report runs/demo                 # writes runs/demo/report.html
rlhf report runs/a runs/b --out cmp.html
"""
