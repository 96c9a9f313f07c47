"""Reports: plain-text tables now; the results store, plots and HTML as they land."""
