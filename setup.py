"""ament_python package: builds with colcon in a ROS 2 workspace and installs with pip in a plain venv."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "surgery_r1_ros"

# training/ and export/ are top-level folders in the repo but must not become top-level modules
# named `training`/`export` in site-packages: map them under the package name.
MAPPED = {f"{PACKAGE}.training": "training", f"{PACKAGE}.export": "export"}
packages = find_packages(include=[PACKAGE, f"{PACKAGE}.*"])
for name, folder in MAPPED.items():
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(where=folder)]

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=packages,
    package_dir=MAPPED,
    package_data={
        PACKAGE: ["resources/builtin_model/*", "resources/*.yaml"],
        f"{PACKAGE}.training": ["configs/*.yaml"],
    },
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*launch.[pxy][yma]*")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml")),
    ],
    python_requires=">=3.10",
    install_requires=[
        "setuptools",
        "numpy>=1.26",
        "pyyaml>=6",
        "pillow>=10",
        "opencv-python-headless>=4.10",
        "matplotlib>=3.8",
        "scikit-learn>=1.4",
        "tqdm>=4.66",
        "safetensors>=0.4",
        "tokenizers>=0.21",
        "torch>=2.4",
        "transformers>=5.17,<6",
        "peft>=0.17",
        "accelerate>=1.10",
        "onnx>=1.17",
        "onnxruntime>=1.20",
        "rosbags>=0.11,<0.12",
    ],
    extras_require={"train": ["trl>=1.16,<2"], "test": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.6"]},
    zip_safe=False,
    maintainer="Surgery-R1 ROS maintainers",
    maintainer_email="maintainers@surgery-r1.invalid",
    description="Surgery-R1 surgical visual question localized-answering for the dVRK, as a ROS 2 node.",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "surgery-r1 = surgery_r1_ros.cli:main",
            "surgery_r1_node = surgery_r1_ros.node.node:main",
        ],
    },
)
