"""What a search writes and the analysis reads: the results contract (file names, columns)
and one vocabulary of statuses and stages. It imports nothing of raysae but the base
(settings, io), so the search's driver, its trials and the analysis all share it."""
