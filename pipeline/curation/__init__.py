"""Curation: the quality of every image of a converted data set, and the reports of a curation."""
