"""THC on brain networks: connectome folders, training and evaluation, pictures, benchmark."""
