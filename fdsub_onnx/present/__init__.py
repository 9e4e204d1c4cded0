"""Presentation: filter grids, saved results, the HTML report and JUnit XML; renders, computes nothing."""
