"""The aggregator: power-law fits with uncertainty, reports, the query API and the CLI.

Imports numpy, scipy, pyarrow, matplotlib and storage only; the CLI loads studies/workers lazily.
"""
