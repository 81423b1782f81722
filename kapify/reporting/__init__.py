"""Reporting: summaries of converted models."""

from .summary import ModelSummary, summary

__all__ = ["ModelSummary", "summary"]
