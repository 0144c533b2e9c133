import llvmlite.binding as ll
ll.initialize_native_target(); ll.initialize_native_asmprinter()
for ty in ("<8 x i32>", "<32 x i8>"):
    ir = f"""
declare <8 x i32> @llvm.x86.avx512.vpdpbusd.256(<8 x i32>, {ty}, {ty})
define <8 x i32> @f(<8 x i32> %a, {ty} %b, {ty} %c) {{
  %r = call <8 x i32> @llvm.x86.avx512.vpdpbusd.256(<8 x i32> %a, {ty} %b, {ty} %c)
  ret <8 x i32> %r
}}"""
    try:
        m = ll.parse_assembly(ir); m.verify()
        tm = ll.Target.from_default_triple().create_target_machine(cpu=ll.get_host_cpu_name(), features=ll.get_host_cpu_features().flatten())
        print(ty, "OK", [l for l in tm.emit_assembly(m).splitlines() if "vpdp" in l])
    except Exception as e:
        print(ty, "FAIL", str(e)[:200])
