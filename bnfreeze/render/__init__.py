"""Renderers: pure functions from a report to a string or a Rich renderable.

They never print and never touch a file; the CLI does that.
"""
