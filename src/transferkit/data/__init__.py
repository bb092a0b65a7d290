"""Images in: listing folders and CSVs, decoding, memory, duplicates, the validation split, class balance."""
