"""Convert an original Dense Connector checkpoint to a transformers folder (see `dense_connector.conversion`).

    python conversion_scripts/convert_dense_connector_to_hf.py \
        --original HuanjinYao/DenseConnector-v1.5-7B --output DenseConnector-v1.5-7B-hf
"""

from dense_connector.conversion import main


if __name__ == "__main__":
    raise SystemExit(main())
