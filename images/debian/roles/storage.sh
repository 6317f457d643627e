# storage nodes: a volume exported over NBD (coronafs part), and an S3
# server (LightningStor part; photon-s3.service, images/debian/customize.sh).
units photon-volume-export.service photon-s3.service
