"""Segment a chest CT without a GUI, through the DRSegUNet module logic.

In Slicer:
    Slicer --no-splash --no-main-window --python-script DRSegUNet/Scripts/segment.py -- \
        --input CT --output SEG.seg.nrrd [--model MODEL] [--device auto|cpu|cuda] [--report REPORT.json] \
        [--install-requirements]
In plain Python with slicer-core installed (``pip install slicer-core``):
    python DRSegUNet/Scripts/segment.py --input CT --output SEG.seg.nrrd ...

CT: a .nrrd/.nii(.gz)/.mha file, a DICOM file or a DICOM series folder, in HU.
MODEL: a checkpoint file or a model version number of the model store (default: the active one).
Exits 0 on success, 2 with a one-line message on bad input (checked before the work: an output
whose folder is missing or not writable, too), 1 on other failures.
"""
import argparse
import os
import sys


def parseArgs(argv):
    p = argparse.ArgumentParser(prog="segment.py", description="Segment GGO, consolidation and lung on a chest CT.")
    p.add_argument("--input", required=True, help="CT volume in HU (file or DICOM series folder)")
    p.add_argument("--output", required=True, help="segmentation to write (.seg.nrrd)")
    p.add_argument("--model", default=None, help="checkpoint file or model version (default: the active model)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--report", default=None, help="also write the JSON report (volumes, %% of lung involved)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--install-requirements", action="store_true",
                   help="inside Slicer: install PyTorch and the Python packages the module needs if they are "
                        "missing (without it, the script stops and names them)")
    if argv and argv[0] == "--":
        argv = argv[1:]
    return p.parse_args(argv)


def _outputProblem(path, option):
    """Why ``path`` cannot be written, in one line, or None. Checked before the work: the writers
    run after the whole volume is segmented, and the .seg.nrrd writer makes no folder."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    if os.path.isdir(path):
        return f"{option} {path} is a folder; give a file name"
    if not os.path.isdir(folder):
        what = "is not a folder" if os.path.exists(folder) else "does not exist"
        return f"the folder of {option} {folder} {what}; create it or write elsewhere"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot write {option} {path}: the folder {folder} is not writable"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return f"cannot write {option} {path}: the file is read-only"
    return None


def _inSlicerApplication(slicer) -> bool:
    return getattr(slicer, "app", None) is not None


def _importSlicerLayer():
    """The module's DRSegUNetSlicer package, from ``..`` (installed, or a checkout's DRSegUNet/ folder)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import DRSegUNetSlicer

    return DRSegUNetSlicer


def main(argv=None) -> int:
    args = parseArgs(sys.argv[1:] if argv is None else argv)
    problem = None
    if not str(args.output).endswith(".seg.nrrd"):
        problem = f"--output must end with .seg.nrrd, got {args.output}"
    problem = problem or _outputProblem(args.output, "--output") or (args.report and _outputProblem(args.report, "--report"))
    if problem:
        print(f"segment.py: error: {problem}", file=sys.stderr)
        return 2
    import slicer

    if not _inSlicerApplication(slicer):
        slicer.mrmlScene = slicer.vtkMRMLScene()
    layer = _importSlicerLayer()
    from DRSegUNetLib.errors import CheckpointError, InputError

    printed = []

    def progress(step, total, message):
        if not args.quiet and total and printed[-1:] != [step]:
            printed.append(step)
            print(f"segment {step}/{total}", file=sys.stderr, flush=True)

    try:
        from DRSegUNetLib.imageio import read_ct

        logic = layer.DRSegUNetLogic(scene=slicer.mrmlScene)
        try:  # inside Slicer: torch (PyTorch extension); scipy ships with Slicer; nothing to do in plain Python
            logic.setupPythonRequirements(askUser=lambda message: args.install_requirements)
        except RuntimeError as e:
            hint = "" if args.install_requirements else " (run again with --install-requirements to install them)"
            raise InputError(f"{e}{hint}") from None
        image = read_ct(args.input)
        name = os.path.basename(os.path.normpath(args.input)).split(".")[0] or "CT"
        volume = layer.volumeNodeFromSitkImage(image, name, slicer.mrmlScene)
        job = logic.segment(volume, model=args.model, device=args.device, progress=progress)
        logic.saveSegmentation(job.segmentationNode, args.output)
        if args.report:
            from DRSegUNetLib.report import write_report  # scipy: ships with Slicer (Resources/requirements.txt)

            report = dict(job.report, input=str(args.input), model=job.modelPath)
            write_report(report, args.report)
    except (InputError, CheckpointError, ValueError, FileNotFoundError, KeyError) as e:
        print(f"segment.py: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one clear line, then the details for a bug report
        import traceback

        traceback.print_exc()
        print(f"segment.py: failed: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"wrote {args.output}" + (f" and {args.report}" if args.report else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    # Whatever happens, end with a status: `Slicer --python-script` would otherwise stay open.
    status = 1
    try:
        status = main()
    except SystemExit as e:  # argparse: --help (0) or bad arguments (2)
        status = e.code if isinstance(e.code, int) else 2
    except BaseException:  # noqa: BLE001 - e.g. the module's packages are missing
        import traceback

        traceback.print_exc()
    finally:
        import slicer

        if _inSlicerApplication(slicer):
            slicer.util.exit(status)
        else:
            sys.exit(status)
