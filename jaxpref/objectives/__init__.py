"""Objectives: Bradley-Terry pair terms, MGDA weights (losses) and ranking / MultiTask / MORE."""
