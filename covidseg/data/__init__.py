"""Reading the archives and making the HDF5 slice stores."""
