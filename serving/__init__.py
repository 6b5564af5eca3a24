"""Ray Serve application over `genmodels.sampling`: online API, bulk jobs, playground.
Arrives with the serving issue."""
