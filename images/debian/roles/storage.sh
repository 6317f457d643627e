# storage nodes: a volume exported over NBD (coronafs part).
units photon-volume-export.service
