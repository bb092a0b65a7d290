"""The web apps: the prediction service and the labelling page, with the pieces they share."""
